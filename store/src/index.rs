//! The index: a RocksDB database holding everything the store remembers
//! besides the objects themselves.
//!
//! Two column families hold every record, its key starting with the byte
//! of its family (`Family::tag`): RocksDB's default one what the store
//! holds (entries, failures, probes, use times, counters), and `prefixes`
//! what was found and placed in prefixes (stat, links, dirs). A session
//! opens, flushes and syncs two sets of tables, not one for each kind of
//! record; and a damaged table of one column family leaves the other's
//! records to rebuild it from (entries are derived again from links).
//!
//! ```text
//! family          key (after the family's byte)           value
//! entries         compile key ‖ flavor tag [‖ mtime ‖ size]  object id ‖ size ‖ header
//!                 compile key ‖ 0  (any flavor: the body)     the same, to derive flavors
//! failures        compile key                             the compiler's message
//! stat            absolute source path                    dev ‖ ino ‖ size ‖ mtime ‖ ctime ‖ seen ‖ blake3
//!                 absolute directory path ‖ 0x00          dev ‖ ino ‖ mtime ‖ ctime ‖ seen ‖ has __pycache__ ‖ (kind ‖ len ‖ name)* (ListingRecord)
//! interpreters    executable path                         identity + probe (JSON)
//! links           absolute pyc path                       object id ‖ flavor tag ‖ trusted ‖ size [‖ dev ‖ ino [‖ epoch ‖ entries key]]
//! dirs            absolute __pycache__ path               (empty): created by pycstore
//! used            object id                               last use, seconds since the epoch
//! counters        interpreter label, or "" for the reset time   Counters (JSON)
//!                 0x00 ‖ "entries-epoch"                  the entries epoch (u64)
//! ```
//!
//! RocksDB lets one process open a database at a time, so the index is used
//! in short sessions: [`Index::open`] waits for `index-v2.lock`, and a
//! session lasts a lookup pass or the write of a batch of [`Writes`]
//! gathered while compiling. Objects are written before the entries that
//! name them, so an entry never points at a missing object after a crash.
//!
//! A value that cannot be read (a damaged block) is a miss for lookups, said
//! once per process; `verify` reads the whole index with checksums and
//! `verify --repair` rebuilds it (`rebuild`). A full disk is
//! [`Error::IndexNoSpace`], never taken for damage.
//!
//! An index of the earlier layout (`index-v1`, a column family for each
//! family) is carried over once, whole, by the first process that opens
//! the store (`rebuild::migrate`).

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, Direction, FlushOptions,
    IngestExternalFileOptions, IteratorMode, Options, ReadOptions, SstFileWriter, WriteBatch, DB,
};
use serde::{Deserialize, Serialize};

pub(crate) mod rebuild;

use crate::key::{CompileKey, SourceDigest};
use crate::lock::{self, LockGuard, LockMode};
use crate::objects::ObjectId;
use crate::pyc::{Flavor, HEADER_LEN};
use crate::{Error, Result};

/// The families of records, in the order of the table above (and of
/// their bytes, [`Family::tag`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Family {
    /// Compile key (and flavor) → object.
    Entries,
    /// Compile key → compiler message.
    Failures,
    /// Source path → stat + digest.
    Stat,
    /// Executable → probe.
    Interpreters,
    /// pyc path → object.
    Links,
    /// `__pycache__` directories pycstore created.
    Dirs,
    /// Object → last use.
    Used,
    /// Usage counters.
    Counters,
}

impl Family {
    const ALL: [Family; 8] = [
        Family::Entries,
        Family::Failures,
        Family::Stat,
        Family::Interpreters,
        Family::Links,
        Family::Dirs,
        Family::Used,
        Family::Counters,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::Entries => "entries",
            Family::Failures => "failures",
            Family::Stat => "stat",
            Family::Interpreters => "interpreters",
            Family::Links => "links",
            Family::Dirs => "dirs",
            Family::Used => "used",
            Family::Counters => "counters",
        }
    }

    /// The family of a column family name of the earlier layout
    /// (`index-v1`), if it is one of ours.
    fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The column family holding this family's records.
    fn column(self) -> Column {
        match self {
            Family::Stat | Family::Links | Family::Dirs => Column::Prefixes,
            _ => Column::Store,
        }
    }

    /// The byte that starts the keys of this family's records: 1 to 8, in
    /// the order of [`Family::ALL`], so records sort by family, then key.
    fn tag(self) -> u8 {
        match self {
            Family::Entries => 1,
            Family::Failures => 2,
            Family::Stat => 3,
            Family::Interpreters => 4,
            Family::Links => 5,
            Family::Dirs => 6,
            Family::Used => 7,
            Family::Counters => 8,
        }
    }

    /// The family of a stored key and the key within it.
    fn split(key: &[u8]) -> Option<(Family, &[u8])> {
        let (&tag, rest) = key.split_first()?;
        let family = Family::ALL.into_iter().find(|f| f.tag() == tag)?;
        Some((family, rest))
    }

    /// The stored key of `key` in this family.
    fn key(self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + key.len());
        k.push(self.tag());
        k.extend_from_slice(key);
        k
    }
}

/// One stored pyc: which object, how big, and its header (to recognise a
/// destination that already holds it without reading the object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The object's content address.
    pub object: ObjectId,
    /// The object's size in bytes.
    pub size: u64,
    /// The object's first 16 bytes.
    pub header: [u8; HEADER_LEN],
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + 8 + HEADER_LEN);
        v.extend_from_slice(&self.object.0);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.header);
        v
    }

    /// Decodes a value of the entries family; `None` when malformed.
    pub(crate) fn decode(v: &[u8]) -> Option<Entry> {
        if v.len() != 32 + 8 + HEADER_LEN {
            return None;
        }
        Some(Entry {
            object: ObjectId(v[..32].try_into().ok()?),
            size: u64::from_le_bytes(v[32..40].try_into().ok()?),
            header: v[40..].try_into().ok()?,
        })
    }
}

/// Which entry of a compile key: a flavor (with the source's stat for
/// timestamp pycs, whose header depends on it), or the body in any flavor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntrySlot {
    /// Any pyc with this body; its header is replaced to derive other flavors.
    Body,
    /// A hash-based flavor.
    Hashed(Flavor),
    /// A timestamp pyc for a source with this mtime (seconds) and size.
    Timestamp {
        /// `st_mtime` in whole seconds.
        mtime: i64,
        /// `st_size`.
        size: u64,
    },
}

impl EntrySlot {
    /// The key of `slot` of compile key `key` in the entries family and in
    /// packs: `key ‖ tag [‖ mtime ‖ size]`.
    pub fn encode_key(self, key: &CompileKey) -> Vec<u8> {
        entry_key(key, self)
    }

    /// Decodes a key of the entries family (or a pack); `None` when it is
    /// not one [`EntrySlot::encode_key`] makes.
    pub(crate) fn decode_key(k: &[u8]) -> Option<(CompileKey, EntrySlot)> {
        let key = CompileKey(k.get(..32)?.try_into().ok()?);
        let slot = match (k.len(), k[32..].first()?) {
            (33, 0) => EntrySlot::Body,
            (33, &tag) if tag == Flavor::CheckedHash.tag() => {
                EntrySlot::Hashed(Flavor::CheckedHash)
            }
            (33, &tag) if tag == Flavor::UncheckedHash.tag() => {
                EntrySlot::Hashed(Flavor::UncheckedHash)
            }
            (49, &tag) if tag == Flavor::Timestamp.tag() => EntrySlot::Timestamp {
                mtime: i64::from_le_bytes(k[33..41].try_into().ok()?),
                size: u64::from_le_bytes(k[41..49].try_into().ok()?),
            },
            _ => return None,
        };
        Some((key, slot))
    }
}

/// What the index remembers of a pyc pycstore placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkRecord {
    /// The object placed.
    pub object: ObjectId,
    /// Whether the interpreter it was compiled for had the common key
    /// domain (see [`crate::interpreter::Interpreter::compile_key`]); `false`
    /// for records that do not say.
    pub trusted: bool,
    /// The size of the pyc placed; `None` for records that do not say
    /// (written before it was recorded).
    pub size: Option<u64>,
    /// The device and inode of the object when it was hardlinked there:
    /// a pyc that still has them (and the owner, mode and size of an
    /// object) is the object, known from one `stat` of the pyc.
    pub inode: Option<(u64, u64)>,
    /// The entry placed (compile key and slot), when it was hardlinked
    /// (recorded with the inode): a later run whose source, interpreter and
    /// flavor make the same key needs no entry lookup to know the pyc it
    /// finds at that inode is the one it wants.
    pub entry: Option<(CompileKey, EntrySlot)>,
    /// The index's entries epoch ([`Index::entries_epoch`]) when it was
    /// recorded, with the key.
    pub epoch: Option<u64>,
}

impl LinkRecord {
    /// Decodes a value of the links family.
    pub(crate) fn decode(v: &[u8]) -> Option<LinkRecord> {
        let le = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        Some(LinkRecord {
            object: ObjectId(v.get(..32)?.try_into().ok()?),
            trusted: v.get(33) == Some(&1),
            size: v.get(34..42).map(le),
            inode: v.get(42..58).map(|b| {
                let (dev, ino) = b.split_at(8);
                (le(dev), le(ino))
            }),
            epoch: v.get(58..66).map(le),
            entry: v.get(66..).and_then(EntrySlot::decode_key),
        })
    }

    /// Whether this pyc was placed for the entry `key` in `slot` by a run
    /// of the entries epoch `epoch`: since then, no entry left the index,
    /// so the pyc is still one the store holds.
    pub(crate) fn placed_for(&self, key: &CompileKey, slot: EntrySlot, epoch: u64) -> bool {
        self.epoch == Some(epoch) && self.entry == Some((*key, slot))
    }
}

/// What a link record says of the pyc it was written for, when that pyc is
/// a hardlink of the entry's object.
pub(crate) struct Placed<'a> {
    /// The object's device and inode.
    pub inode: (u64, u64),
    /// The entries epoch the run started in.
    pub epoch: u64,
    /// The entry's compile key and slot.
    pub key: &'a CompileKey,
    pub slot: EntrySlot,
}

/// The key, in the counters family, of the entries epoch.
pub(crate) const ENTRIES_EPOCH_KEY: &[u8] = b"\0entries-epoch";

/// A value for a new entries epoch: 64 random bits (whatever the clock
/// says), never 0.
pub(crate) fn new_entries_epoch() -> u64 {
    fastrand::u64(1..)
}

/// Whether a key of the entries family counts as an index entry in what
/// commands report (`stats`, `verify`, `gc`, `export`, `import`): every
/// record but a body, which repeats an entry of some flavor. A key that does
/// not decode counts (it is a malformed entry).
pub(crate) fn counts_as_entry(key: &[u8]) -> bool {
    !matches!(EntrySlot::decode_key(key), Some((_, EntrySlot::Body)))
}

fn entry_key(key: &CompileKey, slot: EntrySlot) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + 1 + 16);
    k.extend_from_slice(&key.0);
    match slot {
        EntrySlot::Body => k.push(0),
        EntrySlot::Hashed(flavor) => k.push(flavor.tag()),
        EntrySlot::Timestamp { mtime, size } => {
            k.push(Flavor::Timestamp.tag());
            k.extend_from_slice(&mtime.to_le_bytes());
            k.extend_from_slice(&size.to_le_bytes());
        }
    }
    k
}

/// What the stat cache remembers of a source file: enough of its `stat` to
/// tell it has not changed, and the blake3 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatRecord {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_size`.
    pub size: u64,
    /// `st_mtime` in nanoseconds.
    pub mtime_ns: i64,
    /// `st_ctime` in nanoseconds.
    pub ctime_ns: i64,
    /// When the file was hashed, in nanoseconds since the epoch.
    pub seen_ns: i64,
    /// blake3 of the bytes.
    pub digest: SourceDigest,
}

impl StatRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(6 * 8 + 32);
        for n in [self.dev, self.ino, self.size] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        for n in [self.mtime_ns, self.ctime_ns, self.seen_ns] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.extend_from_slice(&self.digest.0);
        v
    }

    fn decode(v: &[u8]) -> Option<StatRecord> {
        if v.len() != 6 * 8 + 32 {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Some(StatRecord {
            dev: u(0),
            ino: u(1),
            size: u(2),
            mtime_ns: u(3) as i64,
            ctime_ns: u(4) as i64,
            seen_ns: u(5) as i64,
            digest: SourceDigest(v[48..80].try_into().ok()?),
        })
    }
}

/// What the walk remembers of a directory of a prefix: enough of its `stat`
/// to tell its entries have not changed (any entry added, removed or renamed
/// changes its mtime), and the entries the walk needs. Kept in the stat
/// family under the directory's path and a NUL byte, a key no file can have.
///
/// ```text
/// dev ‖ ino ‖ mtime_ns ‖ ctime_ns ‖ seen_ns   (8 bytes each, little-endian)
/// ‖ has __pycache__ (1 byte)
/// ‖ (kind (1 byte: 0 directory, 1 source) ‖ name length (2) ‖ name)*
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListingRecord {
    /// `st_dev` of the directory.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_mtime` in nanoseconds.
    pub mtime_ns: i64,
    /// `st_ctime` in nanoseconds.
    pub ctime_ns: i64,
    /// When it was listed, in nanoseconds since the epoch.
    pub seen_ns: i64,
    /// Whether it held a `__pycache__` directory.
    pub pycache: bool,
    /// Its subdirectories (not `__pycache__`), by name.
    pub dirs: Vec<std::ffi::OsString>,
    /// Its sources (regular `*.py` files), by name.
    pub sources: Vec<std::ffi::OsString>,
}

impl ListingRecord {
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let mut v = Vec::with_capacity(41 + 24 * (self.dirs.len() + self.sources.len()));
        for n in [self.dev, self.ino] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        for n in [self.mtime_ns, self.ctime_ns, self.seen_ns] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.push(u8::from(self.pycache));
        for (kind, names) in [(0u8, &self.dirs), (1u8, &self.sources)] {
            for name in names {
                let name = name.as_bytes();
                v.push(kind);
                // Names are at most 255 bytes (NAME_MAX).
                v.extend_from_slice(&(name.len() as u16).to_le_bytes());
                v.extend_from_slice(name);
            }
        }
        v
    }

    fn decode(v: &[u8]) -> Option<ListingRecord> {
        use std::os::unix::ffi::OsStrExt;
        let fixed = v.get(..41)?;
        let u = |i: usize| u64::from_le_bytes(fixed[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let mut record = ListingRecord {
            dev: u(0),
            ino: u(1),
            mtime_ns: u(2) as i64,
            ctime_ns: u(3) as i64,
            seen_ns: u(4) as i64,
            pycache: match fixed[40] {
                0 => false,
                1 => true,
                _ => return None,
            },
            dirs: Vec::new(),
            sources: Vec::new(),
        };
        let mut rest = &v[41..];
        while let [kind, a, b, tail @ ..] = rest {
            let len = u16::from_le_bytes([*a, *b]) as usize;
            let name = tail
                .get(..len)
                // One plain name: a record never leads the walk up or
                // across directories.
                .filter(|n| !matches!(*n, b"" | b"." | b"..") && !n.contains(&b'/'))?;
            let name = std::ffi::OsStr::from_bytes(name).to_os_string();
            match kind {
                0 => record.dirs.push(name),
                1 => record.sources.push(name),
                _ => return None,
            }
            rest = &tail[len..];
        }
        rest.is_empty().then_some(record)
    }
}

/// Writes of a session from which on they are ingested as tables
/// ([`Index::ingest`]) rather than written through the memtable.
const INGEST_AT: usize = 2000;

/// The key of a directory's [`ListingRecord`]: its path and a NUL byte.
fn listing_key(dir: &Path) -> Vec<u8> {
    let mut key = path_key(dir);
    key.push(0);
    key
}

/// Usage counters of one interpreter since the last `stats --zero`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// pycs placed from objects the store already had.
    pub hits: u64,
    /// pycs that needed a compile.
    pub misses: u64,
    /// Compiles run (one per distinct compile key).
    pub compiles: u64,
    /// pycs that could not be produced (sources that do not compile,
    /// crashed workers).
    pub failures: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.compiles += o.compiles;
        self.failures += o.failures;
    }
}

/// Index writes gathered outside a session, applied in one batch.
#[derive(Default)]
pub struct Writes {
    ops: Vec<(Family, Vec<u8>, Option<Vec<u8>>)>,
    counters: BTreeMap<String, Counters>,
    /// An entries epoch to write (a new one when an entry is deleted or an
    /// object leaves): written first, alone ([`Index::apply`]).
    epoch: Option<u64>,
}

impl Writes {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.counters.is_empty() && self.epoch.is_none()
    }

    /// How many writes are pending.
    pub fn len(&self) -> usize {
        self.ops.len() + self.counters.len()
    }

    /// Records a stored pyc.
    pub fn entry(&mut self, key: &CompileKey, slot: EntrySlot, entry: &Entry) {
        self.ops
            .push((Family::Entries, entry_key(key, slot), Some(entry.encode())));
    }

    /// Remembers that a source does not compile.
    pub fn failure(&mut self, key: &CompileKey, message: &str) {
        self.ops.push((
            Family::Failures,
            key.0.to_vec(),
            Some(message.as_bytes().to_vec()),
        ));
    }

    /// Records the stat cache's view of a source.
    pub fn stat(&mut self, path: &Path, record: &StatRecord) {
        self.ops
            .push((Family::Stat, path_key(path), Some(record.encode())));
    }

    /// Records what the walk listed in the directory `dir`.
    pub fn listing(&mut self, dir: &Path, record: &ListingRecord) {
        self.ops
            .push((Family::Stat, listing_key(dir), Some(record.encode())));
    }

    /// Records that `pyc` (of `size` bytes) was materialized from `entry`'s
    /// object, and its very inode when `inode` says which. The size is kept
    /// so that `stats` counts the pyc the same after `gc` evicted its
    /// object.
    pub(crate) fn link(
        &mut self,
        pyc: &Path,
        entry: &Entry,
        flavor: Flavor,
        trusted: bool,
        placed: Option<Placed<'_>>,
    ) {
        let mut v = entry.object.0.to_vec();
        v.push(flavor.tag());
        v.push(u8::from(trusted));
        v.extend_from_slice(&entry.size.to_le_bytes());
        if let Some(placed) = placed {
            let (dev, ino) = placed.inode;
            v.extend_from_slice(&dev.to_le_bytes());
            v.extend_from_slice(&ino.to_le_bytes());
            v.extend_from_slice(&placed.epoch.to_le_bytes());
            v.extend_from_slice(&entry_key(placed.key, placed.slot));
        }
        self.ops.push((Family::Links, path_key(pyc), Some(v)));
    }

    /// Records that pycstore created this `__pycache__` directory.
    pub(crate) fn created_dir(&mut self, dir: &Path) {
        self.ops
            .push((Family::Dirs, path_key(dir), Some(Vec::new())));
    }

    /// Records a use of `object` at `when` (seconds since the epoch).
    pub fn used(&mut self, object: &ObjectId, when: u64) {
        self.ops.push((
            Family::Used,
            object.0.to_vec(),
            Some(when.to_le_bytes().to_vec()),
        ));
    }

    /// Adds to the counters of interpreter `label`.
    pub fn count(&mut self, label: &str, counters: Counters) {
        *self.counters.entry(label.to_string()).or_default() += counters;
    }

    /// Forgets the last use of `object` (gc does when it evicts it).
    pub fn forget_use(&mut self, object: &ObjectId) {
        self.ops.push((Family::Used, object.0.to_vec(), None));
    }

    /// Forgets that pycstore placed the pyc at `pyc`.
    pub(crate) fn forget_link(&mut self, pyc: &Path) {
        self.ops.push((Family::Links, path_key(pyc), None));
    }

    /// Forgets that pycstore created the `__pycache__` directory `dir`.
    pub(crate) fn forget_dir(&mut self, dir: &Path) {
        self.ops.push((Family::Dirs, path_key(dir), None));
    }

    /// Writes a raw key and value.
    pub(crate) fn put(&mut self, family: Family, key: &[u8], value: &[u8]) {
        self.ops.push((family, key.to_vec(), Some(value.to_vec())));
    }

    /// Deletes a key.
    /// An entry deleted starts a new entries epoch ([`Index::entries_epoch`]).
    pub(crate) fn delete(&mut self, family: Family, key: &[u8]) {
        if family == Family::Entries {
            self.entries_changed();
        }
        self.ops.push((family, key.to_vec(), None));
    }

    /// Starts a new entries epoch (once per batch): link records of an
    /// earlier one no longer vouch that the store holds their pyc's entry
    /// and object. For every entry deleted, and every object removed that
    /// a prefix may still hold.
    pub(crate) fn entries_changed(&mut self) {
        self.epoch.get_or_insert_with(new_entries_epoch);
    }

    /// Sets the entries epoch (a value from [`new_entries_epoch`]).
    pub(crate) fn set_entries_epoch(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
    }

    /// Moves everything of `other` into `self`.
    pub fn append(&mut self, other: &mut Writes) {
        self.ops.append(&mut other.ops);
        if let Some(epoch) = other.epoch.take() {
            self.epoch = Some(epoch);
        }
        for (label, c) in std::mem::take(&mut other.counters) {
            *self.counters.entry(label).or_default() += c;
        }
    }
}

/// RocksDB (as packaged by Debian, with its assertions on) aborts the whole
/// process when it cannot write its own log while opening: refuse to open on
/// a full filesystem instead, with a message that says what to do.
const MIN_FREE_BYTES: u64 = 4 << 20;

/// Room a repair needs besides a second copy of the index: RocksDB's own
/// repair writes a new manifest and turns logs into tables.
const REPAIR_MARGIN: u64 = 16 << 20;

/// Free bytes on the filesystem holding `path` (or its parent, when `path`
/// does not exist yet); `None` when that cannot be told.
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = if path.exists() {
        path
    } else {
        path.parent().unwrap_or(path)
    };
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn check_free_space(path: &Path) -> Result<()> {
    match free_bytes(path) {
        Some(free) if free < MIN_FREE_BYTES => Err(Error::IndexNoSpace {
            path: path.to_path_buf(),
            action: "open",
            detail: format!(
                "only {} KiB free, {} MiB needed",
                free / 1024,
                MIN_FREE_BYTES >> 20
            ),
        }),
        _ => Ok(()),
    }
}

/// Whether a RocksDB error is the filesystem being full.
fn is_no_space(err: &rocksdb::Error) -> bool {
    let message = err.to_string();
    message.contains("No space left on device") || message.contains("ENOSPC")
}

/// The error of a failed open or write: a full disk is told apart from a
/// damaged index, which `verify --repair` can help.
fn open_error(path: &Path, action: &'static str, err: rocksdb::Error) -> Error {
    if is_no_space(&err) {
        return Error::IndexNoSpace {
            path: path.to_path_buf(),
            action,
            detail: err.to_string(),
        };
    }
    Error::Index {
        path: path.to_path_buf(),
        message: format!(
            "{err}; run `pycstore verify --repair` to repair or rebuild it (objects are kept)"
        ),
    }
}

/// Says once per process that the index has unreadable parts; each read that
/// fails is then a miss (compiled again), never a failed file.
fn warn_unreadable(path: &Path, err: &Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    tracing::debug!("a read of the index failed: {err}");
    WARNED.call_once(|| {
        tracing::warn!(
            "part of the index at `{}` cannot be read ({err}); what it held is compiled \
             again: run `pycstore verify --repair` to repair the index",
            path.display()
        );
    });
}

/// The first failed write of this process (a full disk): RocksDB is not
/// opened again after it.
static FAILED_WRITE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The path a key of the stat, links or dirs family names.
pub(crate) fn path_of_key(key: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(key))
}

/// The key prefix of everything under the directory `under` (everything
/// with `None`).
fn dir_prefix(under: Option<&Path>) -> Vec<u8> {
    match under {
        Some(dir) => {
            let mut key = path_key(dir);
            if key.last() != Some(&b'/') {
                key.push(b'/');
            }
            key
        }
        None => Vec::new(),
    }
}

/// The key of a path in the stat, links and dirs families.
pub(crate) fn path_key(path: &Path) -> Vec<u8> {
    path.as_os_str().as_encoded_bytes().to_vec()
}

/// A column family of the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Column {
    /// What the store holds: RocksDB's default column family.
    Store,
    /// What was found and placed in prefixes.
    Prefixes,
}

impl Column {
    const ALL: [Column; 2] = [Column::Store, Column::Prefixes];

    fn name(self) -> &'static str {
        match self {
            Column::Store => "default",
            Column::Prefixes => "prefixes",
        }
    }

    fn from_name(name: &str) -> Option<Column> {
        Column::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// An open session on the index.
pub struct Index {
    db: ManuallyDrop<DB>,
    path: PathBuf,
    /// The column families this session wrote: flushed on close.
    wrote: Vec<Column>,
    /// A write failed (a full disk): nothing more is asked of RocksDB,
    /// which recovers from its log on the next open.
    failed: bool,
    /// The store is shared with a group: files are left group-writable.
    shared: bool,
    /// The options of every lookup.
    reads: ReadOptions,
    _lock: LockGuard,
}

impl Index {
    /// Opens (creating if needed) the index at `path` for reading and
    /// writing, waiting for other processes' sessions to end.
    pub fn open(path: &Path) -> Result<Index> {
        Self::open_session(path, false)
    }

    /// Opens the index for reading only: sessions of readers share the
    /// lock and cost no writes (a read-write open of RocksDB writes a new
    /// manifest and options file and syncs them). Falls back to a read-write
    /// session when the index does not exist yet.
    pub(crate) fn open_read_only(path: &Path) -> Result<Index> {
        if !path.join("CURRENT").exists() {
            return Self::open(path);
        }
        Self::open_session(path, true)
    }

    fn open_session(path: &Path, read_only: bool) -> Result<Index> {
        if let Some(message) = FAILED_WRITE.get() {
            return Err(Error::Index {
                path: path.to_path_buf(),
                message: format!("an earlier write in this run failed: {message}"),
            });
        }
        let lock_path = path.with_extension("lock");
        let mode = if read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        let guard = lock::lock(&lock_path, mode, "")?;
        let opened = if read_only {
            DB::open_cf_descriptors_read_only(&Self::read_options(), path, Self::columns(), false)
        } else {
            check_free_space(path)?;
            sweep_ingest_tables(path);
            DB::open_cf_descriptors(&Self::options(), path, Self::columns())
        };
        let db = opened.map_err(|e| open_error(path, "open", e))?;
        Ok(Index {
            db: ManuallyDrop::new(db),
            path: path.to_path_buf(),
            wrote: Vec::new(),
            failed: false,
            shared: path.parent().is_some_and(crate::trust::is_shared),
            reads: ReadOptions::default(),
            _lock: guard,
        })
    }

    /// [`Index::options`] for a read-only session, which writes nothing:
    /// not even RocksDB's own log (which would be rotated, and get its
    /// thousand-line options dump, at every open). RocksDB runs without a
    /// log when it cannot make one, and it cannot under `/proc`.
    fn read_options() -> Options {
        let mut opts = Self::options();
        opts.set_db_log_dir("/proc/self/pycstore-no-log");
        opts
    }

    /// The options of the index (and of the tables made for ingestion).
    /// Its one column family keeps a bloom filter: most lookups of a warm
    /// run go to small files flushed by earlier sessions.
    fn options() -> Options {
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        // A walk looks keys up in path order: larger blocks, fewer reads.
        table.set_block_size(32 * 1024);
        // A key is found in its block by a binary search among restart
        // points, then read forward from one: every 4th key a restart point
        // rather than every 16th. A re-link of the reference corpus: 7%
        // fewer instructions (callgrind), for a 3% larger index.
        table.set_block_restart_interval(4);
        let mut opts = Options::default();
        opts.set_block_based_table_factory(&table);
        // Universal compaction: the tables of a column family are merged
        // with others of like size (rarely all together) once eight pile
        // up, not four: a warm link of a new prefix adds a large table,
        // and merging it at every such link cost one in six of the
        // link's instructions; small tables of short sessions are merged
        // among themselves.
        opts.set_compaction_style(rocksdb::DBCompactionStyle::Universal);
        opts.set_level_zero_file_num_compaction_trigger(8);
        // A damaged table is a miss for lookups (see `lookup`) and is found
        // by `verify`; without this, a compaction that meets it would stop
        // every later write of the session, and so fail every `link` until
        // a repair.
        opts.set_paranoid_checks(false);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        // A session is short and mostly small: open its tables in the
        // calling thread (the default starts 16 threads per column family
        // on every open), without reading every table's statistics or
        // stat'ing every table file first.
        opts.set_max_file_opening_threads(1);
        // Tables open when first read (at most 16 on open), not all at
        // every open: a link of a few sources reads few of a store's
        // tables. 24.8 ms instead of 26.5 ms for a 10-source link on a
        // store of 36 table files (hyperfine, 60 runs each).
        opts.set_max_open_files(1000);
        opts.set_skip_stats_update_on_db_open(true);
        opts.set_skip_checking_sst_file_sizes_on_db_open(true);
        // RocksDB's own log (`index-v2/LOG`) keeps warnings and errors, not
        // a line per table opened and flushed.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        // The write-ahead log is preallocated to this size (by default to
        // a memtable's, 70 MB) when a session first writes through it, and
        // cut back on close: 18 ms and 10 ms of a link's record phase for a
        // log of a few hundred bytes (large batches are ingested, see
        // `Index::ingest`). A log past it flushes the oldest memtables.
        opts.set_max_total_wal_size(8 << 20);
        // Every read-write open starts a manifest of a few KiB.
        opts.set_manifest_preallocation_size(256 << 10);
        opts
    }

    /// The column families, each with the index's options.
    fn columns() -> [ColumnFamilyDescriptor; 2] {
        Column::ALL.map(|c| ColumnFamilyDescriptor::new(c.name(), Self::options()))
    }

    fn column(&self, column: Column) -> &ColumnFamily {
        self.db
            .cf_handle(column.name())
            .expect("column families are created on open")
    }

    fn cf(&self, family: Family) -> &ColumnFamily {
        self.column(family.column())
    }

    /// Notes that the session wrote to `column`.
    fn mark_written(&mut self, column: Column) {
        if !self.wrote.contains(&column) {
            self.wrote.push(column);
        }
    }

    /// Reads one value.
    pub(crate) fn get(&self, family: Family, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(family), family.key(key))
            .map_err(|e| Error::index(&self.path, e))
    }

    /// Reads one value for a lookup and decodes it where RocksDB holds it
    /// (no copy, and the session's one [`ReadOptions`]: a warm link makes
    /// three lookups per source). A value that cannot be read (a damaged
    /// block of the index) is a miss, with one warning per process.
    fn lookup<T>(
        &self,
        family: Family,
        key: &[u8],
        decode: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<T> {
        match self
            .db
            .get_pinned_cf_opt(self.cf(family), family.key(key), &self.reads)
        {
            Ok(value) => decode(&value?),
            Err(e) => {
                warn_unreadable(&self.path, &Error::index(&self.path, e));
                None
            }
        }
    }

    /// Every key and value of a family whose key starts with `prefix`
    /// (the keys within the family).
    pub(crate) fn scan(&self, family: Family, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let start = family.key(prefix);
        let iter = self.db.iterator_cf(
            self.cf(family),
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| Error::index(&self.path, e))?;
            if !k.starts_with(&start) {
                break;
            }
            out.push((k[1..].to_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Applies gathered writes in one atomic batch.
    pub fn apply(&mut self, writes: Writes) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        // A new epoch goes first, alone: a batch ingested as tables could
        // otherwise delete entries and fail before the epoch.
        if let Some(epoch) = writes.epoch {
            self.mark_written(Family::Counters.column());
            self.db
                .put_cf(
                    self.cf(Family::Counters),
                    Family::Counters.key(ENTRIES_EPOCH_KEY),
                    epoch.to_le_bytes(),
                )
                .map_err(|e| self.write_failed(e))?;
        }
        if writes.ops.len() >= INGEST_AT {
            return self.ingest(writes);
        }
        let mut batch = WriteBatch::default();
        for (family, key, value) in &writes.ops {
            match value {
                Some(v) => batch.put_cf(self.cf(*family), family.key(key), v),
                None => batch.delete_cf(self.cf(*family), family.key(key)),
            }
            self.mark_written(family.column());
        }
        for (label, add) in writes.counters {
            // (Counters that cannot be read start again from zero.)
            let mut c: Counters = self
                .lookup(Family::Counters, label.as_bytes(), |v| {
                    serde_json::from_slice(v).ok()
                })
                .unwrap_or_default();
            c += add;
            let json = serde_json::to_vec(&c).expect("counters serialize");
            let counters = Family::Counters;
            batch.put_cf(self.cf(counters), counters.key(label.as_bytes()), json);
            self.mark_written(counters.column());
        }
        self.db.write(batch).map_err(|e| self.write_failed(e))
    }

    /// Applies many writes as tables built here and added to the index
    /// whole (RocksDB's ingestion), for one column family after the other,
    /// then the counters as a batch: no write-ahead log, no memtable,
    /// nothing to flush on close. A warm link of the reference corpus
    /// writes 26,000 records: about 100 ms through the memtable (and its
    /// flush on close), 30 to 37 ms this way. The tables of a column
    /// family hold disjoint runs of its sorted records, built on every
    /// core, and are added together or not at all. Each record stands on
    /// its own (a pyc's link, a source's stat, an object's use), so a crash
    /// between the two column families loses records, as a crash before
    /// the write would, and leaves none wrong; the store's records go
    /// first, so a pyc's link is never there without its object's use time.
    fn ingest(&mut self, mut writes: Writes) -> Result<()> {
        // By column family, family and key; the last write of a key wins.
        let mut ops = std::mem::take(&mut writes.ops);
        ops.reverse();
        let order = |op: &(Family, Vec<u8>, Option<Vec<u8>>)| (op.0.column(), op.0);
        ops.par_sort_by(|a, b| (order(a), &a.1).cmp(&(order(b), &b.1)));
        ops.dedup_by(|later, first| (later.0, &later.1) == (first.0, &first.1));
        // Uncompressed: they are in level 0 only until RocksDB compacts
        // them with the rest, into compressed tables.
        let mut options = Self::options();
        options.set_compression_type(rocksdb::DBCompressionType::None);
        let (dir, shared) = (&self.path, self.shared);
        let threads = rayon::current_num_threads();
        let runs: Vec<_> = ops
            .chunk_by(|a, b| a.0.column() == b.0.column())
            .flat_map(|column| column.chunks(column.len().div_ceil(threads).max(INGEST_AT)))
            .enumerate()
            .collect();
        let built: Vec<_> = runs
            .into_par_iter()
            .map(|(n, run)| {
                let table = dir.join(format!("ingest-{}-{n}.sst", std::process::id()));
                let written = (|| {
                    let mut writer = SstFileWriter::create(&options);
                    writer.open(&table)?;
                    let mut k = Vec::new();
                    for (family, key, value) in run {
                        k.clear();
                        k.push(family.tag());
                        k.extend_from_slice(key);
                        match value {
                            Some(v) => writer.put(&k, v)?,
                            None => writer.delete(&k)?,
                        }
                    }
                    writer.finish()
                })();
                if shared {
                    // Added as it is (a hard link): readable by the group
                    // even if the session stops before sharing its files.
                    use std::os::unix::fs::PermissionsExt;
                    let _ =
                        std::fs::set_permissions(&table, std::fs::Permissions::from_mode(0o660));
                }
                (run[0].0.column(), table, written)
            })
            .collect();
        let mut ingest = IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        let mut failed = built
            .iter()
            .find_map(|(_, _, written)| written.clone().err());
        for column in Column::ALL {
            let tables: Vec<&PathBuf> = built
                .iter()
                .filter(|(c, _, _)| *c == column)
                .map(|(_, table, _)| table)
                .collect();
            if failed.is_some() || tables.is_empty() {
                continue;
            }
            match self
                .db
                .ingest_external_file_cf_opts(self.column(column), &ingest, tables)
            {
                Ok(()) => self.mark_written(column),
                Err(e) => failed = Some(e),
            }
        }
        for (_, table, _) in &built {
            let _ = std::fs::remove_file(table);
        }
        // Freeing tens of thousands of keys and values takes milliseconds
        // the run need not wait for. (When no thread can be had, the
        // batch is freed here: `spawn` drops the closure it could not run.)
        let _ = std::thread::Builder::new().spawn(move || drop(ops));
        if let Some(e) = failed {
            return Err(self.write_failed(e));
        }
        self.apply(writes)
    }

    /// A write failed: nothing more is asked of RocksDB in this process.
    fn write_failed(&mut self, e: rocksdb::Error) -> Error {
        self.failed = true;
        let _ = FAILED_WRITE.set(e.to_string());
        if is_no_space(&e) {
            open_error(&self.path, "write", e)
        } else {
            Error::index(&self.path, e)
        }
    }

    /// Every entry: its compile key and slot, and its value when it decodes
    /// (`None`: malformed). Keys that are not entry keys are left out.
    pub fn entries(&self) -> Result<Vec<(CompileKey, EntrySlot, Option<Entry>)>> {
        Ok(self
            .scan(Family::Entries, b"")?
            .into_iter()
            .filter_map(|(k, v)| {
                let (key, slot) = EntrySlot::decode_key(&k)?;
                Some((key, slot, Entry::decode(&v)))
            })
            .collect())
    }

    /// The keys of every remembered compile failure.
    pub fn failure_keys(&self) -> Result<Vec<CompileKey>> {
        Ok(self
            .scan(Family::Failures, b"")?
            .into_iter()
            .filter_map(|(k, _)| Some(CompileKey(k.as_slice().try_into().ok()?)))
            .collect())
    }

    /// The pycs recorded as placed under the directory `under` (every one
    /// with `None`), with what was placed (`None`: malformed).
    pub(crate) fn links(&self, under: Option<&Path>) -> Result<Vec<(PathBuf, Option<LinkRecord>)>> {
        Ok(self
            .scan(Family::Links, &dir_prefix(under))?
            .into_iter()
            .map(|(k, v)| (path_of_key(&k), LinkRecord::decode(&v)))
            .collect())
    }

    /// The `__pycache__` directories pycstore created under `under`.
    pub(crate) fn created_dirs(&self, under: Option<&Path>) -> Result<Vec<PathBuf>> {
        Ok(self
            .scan(Family::Dirs, &dir_prefix(under))?
            .into_iter()
            .map(|(k, _)| path_of_key(&k))
            .collect())
    }

    /// [`Index::lookup`] of many stored keys of `family` ([`Family::key`]) at once
    /// (RocksDB's batched `MultiGet`: a directory's keys share its tables'
    /// filters and blocks), in the order of `keys`.
    fn lookup_many<T>(
        &self,
        family: Family,
        keys: &[Vec<u8>],
        decode: impl Fn(&[u8]) -> Option<T>,
    ) -> Vec<Option<T>> {
        let sorted = keys.is_sorted();
        self.db
            .batched_multi_get_cf_opt(self.cf(family), keys, sorted, &self.reads)
            .into_iter()
            .map(|value| match value {
                Ok(value) => decode(&value?),
                Err(e) => {
                    warn_unreadable(&self.path, &Error::index(&self.path, e));
                    None
                }
            })
            .collect()
    }

    /// The stat cache's records of `paths` ([`Index::stat`] of each).
    pub(crate) fn stats<'p>(
        &self,
        paths: impl IntoIterator<Item = &'p Path>,
    ) -> Vec<Option<StatRecord>> {
        self.lookup_paths(Family::Stat, paths, StatRecord::decode)
    }

    /// [`Index::lookup_many`] of paths, in a family keyed by path.
    fn lookup_paths<'p, T>(
        &self,
        family: Family,
        paths: impl IntoIterator<Item = &'p Path>,
        decode: impl Fn(&[u8]) -> Option<T>,
    ) -> Vec<Option<T>> {
        let keys: Vec<_> = paths
            .into_iter()
            .map(|p| family.key(p.as_os_str().as_encoded_bytes()))
            .collect();
        self.lookup_many(family, &keys, decode)
    }

    /// [`Index::entry`] of each key and slot.
    pub(crate) fn entries_of(&self, wanted: &[(CompileKey, EntrySlot)]) -> Vec<Option<Entry>> {
        let keys: Vec<_> = wanted
            .iter()
            .map(|(k, s)| Family::Entries.key(&entry_key(k, *s)))
            .collect();
        self.lookup_many(Family::Entries, &keys, Entry::decode)
    }

    /// What `link` recorded of each pyc (an unreadable record is none).
    pub(crate) fn link_records<'p>(
        &self,
        pycs: impl IntoIterator<Item = &'p Path>,
    ) -> Vec<Option<LinkRecord>> {
        self.lookup_paths(Family::Links, pycs, LinkRecord::decode)
    }

    /// Looks up a stored pyc. An undecodable or unreadable value is a miss.
    pub fn entry(&self, key: &CompileKey, slot: EntrySlot) -> Result<Option<Entry>> {
        Ok(self.lookup(Family::Entries, &entry_key(key, slot), Entry::decode))
    }

    /// The compiler's message for a source that does not compile, if known
    /// (an unreadable value is not known).
    pub fn failure(&self, key: &CompileKey) -> Result<Option<String>> {
        Ok(self.lookup(Family::Failures, &key.0, |v| {
            Some(String::from_utf8_lossy(v).into_owned())
        }))
    }

    /// The stat cache's record of a source path (an unreadable one is a
    /// miss: the source is hashed again).
    pub fn stat(&self, path: &Path) -> Result<Option<StatRecord>> {
        Ok(self.lookup(Family::Stat, &path_key(path), StatRecord::decode))
    }

    /// What the walk listed in the directory `dir` (an unreadable record is
    /// a miss: the directory is listed again).
    pub fn listing(&self, dir: &Path) -> Option<ListingRecord> {
        self.lookup(Family::Stat, &listing_key(dir), ListingRecord::decode)
    }

    /// A cached interpreter probe (JSON); an unreadable one is a miss.
    pub fn interpreter(&self, exe: &Path) -> Result<Option<Vec<u8>>> {
        Ok(self.lookup(Family::Interpreters, &path_key(exe), |v| Some(v.to_vec())))
    }

    /// The entries epoch: a value that changes whenever an entry leaves the
    /// index (`gc`, `verify --repair`, a rebuild), `None` for an index that
    /// never had one. A link record of the current epoch, for the very
    /// entry key a run wants, shows a pyc the store still holds without
    /// looking the entry up.
    pub(crate) fn entries_epoch(&self) -> Option<u64> {
        self.lookup(Family::Counters, ENTRIES_EPOCH_KEY, |v| {
            Some(u64::from_le_bytes(v.try_into().ok()?))
        })
    }

    /// The counters of interpreter `label` ("" holds the time of the last reset).
    pub fn counters(&self, label: &str) -> Result<Counters> {
        Ok(self
            .get(Family::Counters, label.as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    /// The index directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Index {
    /// Ends the session: flushes what it wrote, so the next session does
    /// not replay the write-ahead log, and compacts when small files pile
    /// up. A flush that fails (the filesystem is full) is an error: what
    /// the session wrote stays in the write-ahead log, and the next session
    /// that can write takes it from there.
    pub fn close(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.failed {
            // Closing RocksDB after a failed write (a full disk) makes the
            // library abort the process; leave the database as a crash
            // would, to be recovered from its log by the next session.
            return Ok(());
        }
        let wrote = std::mem::take(&mut self.wrote);
        if wrote.is_empty() {
            return Ok(());
        }
        let columns: Vec<&ColumnFamily> = wrote.iter().map(|c| self.column(*c)).collect();
        // (Nearly free for a column family only ingested: its memtable is
        // empty.)
        flush(&self.db, &columns).map_err(|message| flush_error(&self.path, message))?;
        // The index's small tables are merged by RocksDB as they come
        // (universal compaction: small tables with small ones, rarely all),
        // in the background, started right after a flush or an ingestion;
        // a session's end would stop it, so it is waited for, unless it
        // fails (the next session tries again). RocksDB says a compaction
        // is pending even when it finds none worth doing (as many tables
        // as its trigger, of unlike sizes): one pending that has not
        // started within `COMPACTION_START` is not waited for.
        let mut idle_since = std::time::Instant::now();
        let compacting = |db: &DB| {
            if property(db, None, "rocksdb.num-running-compactions") > 0 {
                idle_since = std::time::Instant::now();
                return true;
            }
            idle_since.elapsed() < COMPACTION_START
                && columns
                    .iter()
                    .any(|cf| property(db, Some(cf), "rocksdb.compaction-pending") > 0)
        };
        if let Err(message) = settle(&self.db, "compaction", &COMPACTION_PATIENCE, compacting) {
            tracing::debug!(
                "a compaction of `{}` failed: {message}",
                self.path.display()
            );
        }
        Ok(())
    }
}

impl Drop for Index {
    /// [`Index::close`], for a session not closed by it (its error, if
    /// any, is only logged).
    fn drop(&mut self) {
        let closing = !self.failed;
        if let Err(e) = self.finish() {
            tracing::debug!("{e}");
        }
        if !closing {
            return;
        }
        // SAFETY: `db` is not used after this, and dropped only here.
        unsafe { ManuallyDrop::drop(&mut self.db) };
        if self.shared {
            share_files(&self.path);
        }
    }
}

/// Flushes the memtables of `columns` and waits for the flushes to end.
///
/// RocksDB's own wait (`flush_cf`) never ends when a flush fails for lack
/// of space (or of inodes) with `paranoid_checks` off, as the index runs:
/// the failure is then no error to it, and the memtable stays, waiting for
/// a flush that is not tried again. So the flushes are started without
/// waiting, and watched: done when no memtable is waiting, failed when one
/// still is [`FLUSH_PATIENCE`] after RocksDB counted a new
/// background error (it logs which in the index's `LOG`). The error may be
/// another's, a compaction's that met a damaged table: a flush that
/// finishes meanwhile is done. Nothing is lost by a failed flush: what the
/// memtables hold is in the write-ahead log.
pub(crate) fn flush(db: &DB, columns: &[&ColumnFamily]) -> std::result::Result<(), String> {
    let mut options = FlushOptions::default();
    options.set_wait(false);
    for cf in columns {
        db.flush_cf_opt(cf, &options).map_err(|e| e.to_string())?;
    }
    settle(db, "flush", &FLUSH_PATIENCE, |db| {
        columns
            .iter()
            .any(|cf| property(db, Some(cf), "rocksdb.num-immutable-mem-table") > 0)
    })
}

/// An integer property of the index, or of one of its column families
/// (0 when RocksDB does not say).
fn property(db: &DB, column: Option<&ColumnFamily>, name: &str) -> u64 {
    match column {
        Some(cf) => db.property_int_value_cf(cf, name),
        None => db.property_int_value(name),
    }
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// How long to wait for RocksDB's background work of one kind.
struct Patience {
    /// After RocksDB counted a new background error.
    after_error: std::time::Duration,
    /// In all.
    total: std::time::Duration,
}

/// A flush: given time to finish after an error that may be another's.
const FLUSH_PATIENCE: Patience = Patience {
    after_error: std::time::Duration::from_secs(3),
    total: std::time::Duration::MAX,
};

/// A compaction: left (to be stopped as the session ends, and picked again
/// by the next) once an error is counted or it takes too long, as one that
/// meets a damaged table may be picked again and again.
const COMPACTION_PATIENCE: Patience = Patience {
    after_error: std::time::Duration::ZERO,
    total: std::time::Duration::from_secs(600),
};

/// How long a compaction RocksDB says is pending is given to start.
const COMPACTION_START: std::time::Duration = std::time::Duration::from_millis(2);

/// Waits while `busy` says RocksDB's background `work` is not done, as
/// long as `patience` allows.
fn settle(
    db: &DB,
    work: &str,
    patience: &Patience,
    mut busy: impl FnMut(&DB) -> bool,
) -> std::result::Result<(), String> {
    let errors = || property(db, None, "rocksdb.background-errors");
    let before = errors();
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(20);
    let mut failed_at = None;
    loop {
        if !busy(db) {
            return Ok(());
        }
        match failed_at {
            None if errors() > before => failed_at = Some(std::time::Instant::now()),
            Some(at) if at.elapsed() >= patience.after_error => {
                return Err(format!("a background {work} failed"));
            }
            _ if start.elapsed() > patience.total => {
                return Err(format!(
                    "a background {work} took longer than {:?}",
                    patience.total
                ));
            }
            _ => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_micros(500));
    }
}

/// Whether the filesystem holding `path` is full: less than
/// [`MIN_FREE_BYTES`] free, or no inode left.
pub(crate) fn filesystem_full(path: &Path) -> bool {
    rustix::fs::statvfs(path).is_ok_and(|st| {
        st.f_bavail.saturating_mul(st.f_frsize) < MIN_FREE_BYTES
            || (st.f_files > 0 && st.f_favail == 0)
    })
}

/// The error of a failed [`flush`] of the index at `path`: whether the
/// filesystem is full is said.
fn flush_error(path: &Path, message: String) -> Error {
    let full = filesystem_full(path);
    Error::IndexFlush {
        path: path.to_path_buf(),
        detail: format!(
            "{message}{}; RocksDB's log `{}` says why",
            if full { ": the filesystem is full" } else { "" },
            path.join("LOG").display()
        ),
        full,
    }
}

/// Removes the tables a session building them for ingestion left behind
/// (killed before adding them). Called holding the exclusive lock: no
/// other session is building one.
fn sweep_ingest_tables(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("ingest-") && name.ends_with(".sst") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// In a store shared with a group, RocksDB's files (created under the
/// process umask) are made group-writable, so the next member can open them.
fn share_files(dir: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let uid = rustix::process::geteuid().as_raw();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.uid() == uid && meta.mode() & 0o060 != 0o060 {
            let mode = meta.mode() & 0o7777 | 0o060;
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Index {
        /// Records written through the memtable since it was last flushed.
        fn memtable_records(&self) -> u64 {
            Column::ALL
                .iter()
                .map(|c| {
                    property(
                        &self.db,
                        Some(self.column(*c)),
                        "rocksdb.num-entries-active-mem-table",
                    )
                })
                .sum()
        }
    }

    #[test]
    fn a_listing_record_names_only_plain_entries() {
        let record = ListingRecord {
            dev: 1,
            ino: 2,
            mtime_ns: 3,
            ctime_ns: 4,
            seen_ns: 5,
            pycache: true,
            dirs: vec!["pkg".into()],
            sources: vec!["a.py".into()],
        };
        assert_eq!(
            ListingRecord::decode(&record.encode()),
            Some(record.clone())
        );
        for bad in ["..", ".", "a/b", ""] {
            let mut forged = record.clone();
            forged.dirs.push(bad.into());
            assert_eq!(ListingRecord::decode(&forged.encode()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_large_batch_is_ingested_and_reads_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        {
            let mut index = Index::open(&path).unwrap();
            let mut w = Writes::default();
            w.ops.push((Family::Used, b"gone".to_vec(), Some(vec![1])));
            index.apply(w).unwrap();
            assert_eq!(index.memtable_records(), 1);
        }
        let links = |session: u8| {
            let mut w = Writes::default();
            for i in 0..INGEST_AT {
                let key = format!("/p/{i:05}").into_bytes();
                w.ops.push((Family::Links, key, Some(vec![session])));
            }
            w
        };
        {
            let mut index = Index::open(&path).unwrap();
            let mut w = links(1);
            // The last write of a key wins; a delete removes what an
            // earlier session wrote.
            w.ops
                .push((Family::Links, b"/p/00007".to_vec(), Some(vec![9])));
            w.ops.push((Family::Used, b"gone".to_vec(), None));
            w.ops.push((Family::Used, b"new".to_vec(), Some(vec![3])));
            w.ops.push((Family::Used, b"new".to_vec(), None));
            w.ops.push((Family::Used, b"new".to_vec(), Some(vec![4])));
            w.count("x", Counters::default());
            index.apply(w).unwrap();
            // Only the counters went through the memtable.
            assert_eq!(index.memtable_records(), 1);
        }
        let leftovers = || {
            std::fs::read_dir(&path)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ingest-"))
                .count()
        };
        assert_eq!(leftovers(), 0);
        {
            let index = Index::open_read_only(&path).unwrap();
            assert_eq!(
                index.get(Family::Links, b"/p/00007").unwrap(),
                Some(vec![9])
            );
            assert_eq!(
                index.get(Family::Links, b"/p/01999").unwrap(),
                Some(vec![1])
            );
            assert_eq!(index.get(Family::Used, b"gone").unwrap(), None);
            assert_eq!(index.get(Family::Used, b"new").unwrap(), Some(vec![4]));
            assert!(index.get(Family::Counters, b"x").unwrap().is_some());
        }
        // Written through the memtable, then ingested over and beside it:
        // nothing is left in the log on close.
        {
            let mut index = Index::open(&path).unwrap();
            let mut w = Writes::default();
            w.ops.push((Family::Links, b"/zzz".to_vec(), Some(vec![5])));
            w.ops
                .push((Family::Links, b"/p/00008".to_vec(), Some(vec![5])));
            index.apply(w).unwrap();
            let mut w = links(1);
            w.ops.retain(|op| op.1 != b"/p/00008");
            w.ops
                .push((Family::Counters, b"y".to_vec(), Some(b"{}".to_vec())));
            w.count("y", Counters::default());
            index.apply(w).unwrap();
        }
        let logged: u64 = std::fs::read_dir(&path)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(logged, 0, "left in the log on close");
        {
            let index = Index::open_read_only(&path).unwrap();
            assert_eq!(index.get(Family::Links, b"/zzz").unwrap(), Some(vec![5]));
            assert_eq!(
                index.get(Family::Links, b"/p/00008").unwrap(),
                Some(vec![5])
            );
            assert_eq!(
                index.get(Family::Links, b"/p/00007").unwrap(),
                Some(vec![1])
            );
        }
        // Sessions that each add a table keep the small files few.
        for session in 2..14 {
            Index::open(&path).unwrap().apply(links(session)).unwrap();
        }
        let index = Index::open(&path).unwrap();
        let level0 = index
            .db
            .property_int_value_cf(index.cf(Family::Links), "rocksdb.num-files-at-level0")
            .unwrap()
            .unwrap();
        assert!(level0 < 8, "{level0} tables at level 0");
        assert_eq!(
            index.get(Family::Links, b"/p/00007").unwrap(),
            Some(vec![13])
        );
        drop(index);
        // A table left by a session killed while building it is removed by
        // the next session that writes.
        std::fs::write(path.join("ingest-1-0.sst"), b"partial").unwrap();
        drop(Index::open_read_only(&path).unwrap());
        assert_eq!(leftovers(), 1);
        drop(Index::open(&path).unwrap());
        assert_eq!(leftovers(), 0);
    }

    #[test]
    fn link_records_vouch_for_their_entry_until_an_entry_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let key = CompileKey([7; 32]);
        let slot = EntrySlot::Hashed(Flavor::CheckedHash);
        let entry = Entry {
            object: ObjectId([9; 32]),
            size: 1234,
            header: [3; 16],
        };
        let pyc = Path::new("/p/__pycache__/m.cpython-311.pyc");
        let epoch = new_entries_epoch();
        {
            let mut index = Index::open(&path).unwrap();
            assert_eq!(index.entries_epoch(), None);
            let mut w = Writes::default();
            w.set_entries_epoch(epoch);
            w.entry(&key, slot, &entry);
            let placed = Placed {
                inode: (1, 2),
                epoch,
                key: &key,
                slot,
            };
            w.link(pyc, &entry, Flavor::CheckedHash, true, Some(placed));
            index.apply(w).unwrap();
        }
        let index = Index::open_read_only(&path).unwrap();
        assert_eq!(index.entries_epoch(), Some(epoch));
        let record = index.link_records([pyc]).pop().unwrap().unwrap();
        assert_eq!((record.inode, record.size), (Some((1, 2)), Some(1234)));
        assert!(record.placed_for(&key, slot, epoch));
        // Another mode, another source mtime, another key, another epoch.
        let unchecked = EntrySlot::Hashed(Flavor::UncheckedHash);
        assert!(!record.placed_for(&key, unchecked, epoch));
        let stamp = EntrySlot::Timestamp { mtime: 1, size: 2 };
        assert!(!record.placed_for(&key, stamp, epoch));
        assert!(!record.placed_for(&CompileKey([8; 32]), slot, epoch));
        assert!(!record.placed_for(&key, slot, epoch ^ 2));
        // A record of before records carried the entry: nothing vouched.
        let old =
            LinkRecord::decode(&index.get(Family::Links, &path_key(pyc)).unwrap().unwrap()[..58])
                .unwrap();
        assert_eq!(old.inode, Some((1, 2)));
        assert!(!old.placed_for(&key, slot, epoch));
        drop(index);
        // An entry leaving the index (gc, verify --repair) starts a new
        // epoch, as a rebuild does.
        let mut index = Index::open(&path).unwrap();
        let mut w = Writes::default();
        w.delete(Family::Entries, &entry_key(&key, slot));
        index.apply(w).unwrap();
        let after_delete = index.entries_epoch().unwrap();
        assert_ne!(after_delete, epoch);
        assert!(!record.placed_for(&key, slot, after_delete));
        drop(index);
        rebuild::rebuild(&path, |_| Writes::default()).unwrap();
        let index = Index::open_read_only(&path).unwrap();
        let rebuilt = index.entries_epoch().unwrap();
        assert_ne!(rebuilt, after_delete);
        let record = index.link_records([pyc]).pop().unwrap().unwrap();
        assert!(!record.placed_for(&key, slot, rebuilt));
        drop(index);
        // A batch large enough to be ingested as tables starts a new epoch
        // too (written before the tables, alone).
        let mut w = Writes::default();
        for i in 0..INGEST_AT as u16 {
            let mut k = [0; 32];
            k[..2].copy_from_slice(&i.to_le_bytes());
            w.delete(Family::Entries, &entry_key(&CompileKey(k), slot));
        }
        Index::open(&path).unwrap().apply(w).unwrap();
        let epoch = Index::open_read_only(&path)
            .unwrap()
            .entries_epoch()
            .unwrap();
        assert_ne!(epoch, rebuilt);
    }

    #[test]
    fn writes_round_trip_per_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let key = CompileKey([7; 32]);
        let entry = Entry {
            object: ObjectId([9; 32]),
            size: 1234,
            header: [3; 16],
        };
        let rec = StatRecord {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
            seen_ns: 6,
            digest: SourceDigest([8; 32]),
        };
        {
            let mut index = Index::open(&path).unwrap();
            let mut w = Writes::default();
            w.entry(&key, EntrySlot::Hashed(Flavor::CheckedHash), &entry);
            w.stat(Path::new("/a/b.py"), &rec);
            w.count(
                "cpython-311",
                Counters {
                    hits: 2,
                    ..Counters::default()
                },
            );
            w.count(
                "cpython-311",
                Counters {
                    hits: 1,
                    compiles: 1,
                    ..Counters::default()
                },
            );
            index.apply(w).unwrap();
        }
        // A second session (the first released the lock) sees it all.
        let index = Index::open(&path).unwrap();
        assert_eq!(
            index
                .entry(&key, EntrySlot::Hashed(Flavor::CheckedHash))
                .unwrap(),
            Some(entry)
        );
        assert_eq!(index.entry(&key, EntrySlot::Body).unwrap(), None);
        assert_eq!(
            index
                .entry(&key, EntrySlot::Timestamp { mtime: 1, size: 2 })
                .unwrap(),
            None
        );
        assert_eq!(index.stat(Path::new("/a/b.py")).unwrap(), Some(rec));
        let c = index.counters("cpython-311").unwrap();
        assert_eq!((c.hits, c.compiles), (3, 1));
        assert_eq!(index.scan(Family::Stat, b"/a/").unwrap().len(), 1);
    }
}
