//! Packs: store entries and the objects they name in one zstd-compressed
//! stream, to carry compiled pycs to another machine (a CI cache, a BuildKit
//! cache mount, an artifact) so that it links them instead of compiling.
//!
//! ```text
//! pack = a zstd frame (with zstd's content checksum) ‖ a seal
//!
//! the zstd frame decompresses to:
//! ┌─────────────────────────────────────────────────────────────────┐
//! │ header   "pycstore pack\0" (14 bytes) ‖ format version u32      │
//! │          ‖ at most: objects u64 ‖ their bytes u64 ‖ entries u64 │
//! │          ‖ failures u64                                         │
//! ├─────────────────────────────────────────────────────────────────┤
//! │ 'O' ‖ object id [32] ‖ length u64 ‖ the object's bytes          │ objects, each once,
//! │ …                                                               │ before what names them
//! ├─────────────────────────────────────────────────────────────────┤
//! │ 'E' ‖ key length u8 ‖ key ‖ value length u8 ‖ value             │ records of the index's
//! │ …                                                               │ entries family, verbatim
//! ├─────────────────────────────────────────────────────────────────┤
//! │ 'F' ‖ key length u8 ‖ key ‖ message length u32 ‖ message        │ records of its
//! │ …                                                               │ failures family
//! ├─────────────────────────────────────────────────────────────────┤
//! │ 'T' ‖ entries u64 ‖ failures u64 ‖ objects u64 ‖ blake3 [32]    │ trailer: the counts, and
//! └─────────────────────────────────────────────────────────────────┘ the blake3 of every byte
//!                                                                     before the blake3 itself
//!
//! the seal, a zstd skippable frame (zstd tools skip it):
//! ┌─────────────────────────────────────────────────────────────────┐
//! │ 0x184d2a50 u32 ‖ 32 u32 ‖ blake3 [32] of the compressed bytes   │
//! └─────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Integers are little-endian; lengths count bytes. An object id is the
//! blake3 of the object's bytes. The header declares upper bounds of what
//! follows (export may leave out an object that vanished meanwhile), so an
//! import knows before the first object how much memory and disk the pack
//! may take, and stops at the first record beyond them. The trailer vouches for the contents, the
//! seal for every byte of the file: a byte flipped where it would not change
//! what zstd decompresses (a header field, padding) is caught all the same.
//! Nothing machine-local travels: not the stat cache, interpreter probes,
//! links, created directories, use times or counters.
//!
//! [`import`] streams: one thread decompresses, another checks each object's
//! bytes against its id, checks that it is a pyc Python can load
//! ([`crate::marshal`]) and writes it to the store's `tmp/`, and only the
//! objects between them (at most `IN_FLIGHT` bytes, 64 MiB), the entries and the
//! failures are held in memory. No length read from a pack is trusted
//! beyond `MAX_OBJECT_LEN` (64 MiB) per object, the header's declared totals, and
//! `MAX_RECORDS_MEMORY` (256 MiB) for what is kept in memory until the end: `tmp/`
//! never receives more than the header declared.
//! Only when the trailer's counts and blake3 match, the seal follows and
//! matches, and every entry names an object of the pack (or of the store)
//! with the size and header the entry records, does it move the objects into
//! place and apply the entries and failures in one index batch. Anything
//! else is an [`Error::Pack`]: the temp files are removed, and the index was
//! not even opened, so the store is left as it was.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::index::{path_key, Entry, EntrySlot, Family, Writes};
use crate::interpreter::Interpreter;
use crate::key::CompileKey;
use crate::objects::ObjectId;
use crate::pyc::HEADER_LEN;
use crate::util::with_path;
use crate::{Error, Result, Store};

/// The first bytes of every pack (uncompressed).
const MAGIC: &[u8; 14] = b"pycstore pack\0";

/// The pack format this build writes and reads (2: the header declares
/// its totals).
pub(crate) const FORMAT_VERSION: u32 = 2;

/// zstd's level. On the reference corpus pycs compress 2.5:1 at -1, 2.7:1
/// at 1 and 3.1:1 at 3; levels 1 and 3 take 1.2 and 2 times as long to
/// compress as -1, and 1.2 and 1.4 times as long to decompress. A pack
/// exists to save time.
const LEVEL: i32 = -1;

/// The largest object an import accepts: a pyc (the largest in CPython's
/// stdlib is under 1 MiB).
pub(crate) const MAX_OBJECT_LEN: u64 = 64 << 20;
/// The longest compile failure message kept.
const MAX_MESSAGE_LEN: u32 = 1 << 20;
/// How many bytes of objects an import holds between its reading and its
/// storing thread.
pub(crate) const IN_FLIGHT: u64 = 64 << 20;
/// One credit of [`IN_FLIGHT`].
const CREDIT: u64 = 1 << 20;
/// What an import may hold in memory until it applies the pack: entries,
/// failures and the bookkeeping of each object (about two million entries
/// and a million objects).
pub(crate) const MAX_RECORDS_MEMORY: u64 = 256 << 20;
/// What each record costs in memory besides its bytes.
const RECORD_COST: u64 = 128;
const OBJECT_COST: u64 = 256;
/// The largest zstd window an import decodes (`--long` frames beyond it are
/// refused); packs are written with level -1, whose window is 2^19.
const WINDOW_LOG_MAX: u32 = 24;

/// The seal: a zstd skippable frame's magic number, and the length of its
/// content (a blake3).
const SEAL_MAGIC: u32 = 0x184d_2a50;
const SEAL_LEN: usize = 4 + 4 + 32;
/// The first bytes of a zstd frame.
const ZSTD_MAGIC: u32 = 0xfd2f_b528;

/// How many objects the export's reading thread may be ahead of the writer.
const READ_AHEAD: usize = 64;

/// How many objects the import's reading thread may be ahead of the one
/// storing them (and at most [`IN_FLIGHT`] bytes).
const STORE_AHEAD: usize = 64;

/// Record tags.
const OBJECT: u8 = b'O';
const ENTRY: u8 = b'E';
const FAILURE: u8 = b'F';
const TRAILER: u8 = b'T';

/// Which entries to export. Empty lists select everything, failures
/// included; with a selection, entries must match every list given, and
/// failures are left out (the index does not record which interpreter or
/// prefix a failure belongs to; a file left out is tried again once).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Only entries for these interpreters (whose pyc magic number is theirs).
    pub python: Vec<PathBuf>,
    /// Only entries whose object is linked into one of these prefixes, with
    /// the bodies of the same compile keys (from which other flavors derive).
    pub prefixes: Vec<PathBuf>,
}

impl Selection {
    /// Whether everything is selected.
    pub(crate) fn is_everything(&self) -> bool {
        self.python.is_empty() && self.prefixes.is_empty()
    }
}

/// What `export` wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    /// Entries written (compile key and invalidation mode → object; the
    /// stored bodies that repeat them are not counted, as in `stats`).
    pub entries: u64,
    /// Remembered compile failures written.
    pub failures: u64,
    /// Objects written, each once.
    pub objects: u64,
    /// Their total size, uncompressed.
    pub object_bytes: u64,
    /// The size of the pack.
    pub pack_bytes: u64,
    /// Selected entries left out: their object vanished (gc) or is damaged,
    /// or the entry is malformed (see the warnings).
    pub skipped_entries: u64,
    /// What was left out, and why.
    pub warnings: Vec<String>,
    /// Wall time in seconds.
    pub elapsed_seconds: f64,
}

/// What `import` added.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    /// Entries in the pack (counted as [`ExportReport::entries`]).
    pub entries: u64,
    /// Entries added to the index; the others were there already.
    pub entries_added: u64,
    /// Compile failures in the pack.
    pub failures: u64,
    /// Compile failures added to the index.
    pub failures_added: u64,
    /// Objects in the pack.
    pub objects: u64,
    /// Objects added to the store.
    pub objects_added: u64,
    /// Objects of the pack the store already had.
    pub objects_present: u64,
    /// The size of the objects added.
    pub object_bytes: u64,
    /// The size of the pack.
    pub pack_bytes: u64,
    /// Wall time in seconds.
    pub elapsed_seconds: f64,
}

/// An entry as read from the index or a pack: its raw key and value, decoded.
struct RawEntry {
    key: Vec<u8>,
    value: Vec<u8>,
    entry: Entry,
    compile_key: CompileKey,
    is_body: bool,
}

impl RawEntry {
    /// Checks the shape of the key (compile key ‖ slot tag [‖ mtime ‖ size])
    /// and decodes the value.
    fn new(key: Vec<u8>, value: Vec<u8>) -> Option<RawEntry> {
        let (compile_key, slot) = EntrySlot::decode_key(&key)?;
        let entry = Entry::decode(&value)?;
        Some(RawEntry {
            key,
            value,
            entry,
            compile_key,
            is_body: slot == EntrySlot::Body,
        })
    }
}

/// What the index said, for the selection.
struct Chosen {
    entries: Vec<RawEntry>,
    failures: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Writes a pack of the selected entries, their objects and (when everything
/// is selected) the remembered failures to `out`, which it flushes at the end.
/// `name` is what to call `out` in messages.
///
/// The index is read in one session; the objects are read after it. An
/// object that vanished meanwhile (gc) or does not match its id leaves its
/// entries out, with a warning.
pub fn export<W: Write>(
    store: &Store,
    selection: &Selection,
    out: W,
    name: &Path,
) -> Result<ExportReport> {
    let started = Instant::now();
    let mut report = ExportReport::default();
    let chosen = choose(store, selection, &mut report)?;
    tracing::debug!("read the index in {:.3}s", started.elapsed().as_secs_f64());
    // Each object once, in the order of the shards on disk.
    let mut ids: Vec<ObjectId> = chosen.entries.iter().map(|e| e.entry.object).collect();
    ids.sort_unstable_by_key(|id| id.0);
    ids.dedup();

    // The largest size any entry records for each object: the header
    // declares their sum, and an object found bigger is left out.
    let mut expected: HashMap<ObjectId, u64> = HashMap::new();
    for raw in &chosen.entries {
        let size = expected.entry(raw.entry.object).or_default();
        *size = (*size).max(raw.entry.size);
    }
    let declared = Declared {
        objects: ids.len() as u64,
        object_bytes: expected.values().sum(),
        entries: chosen.entries.len() as u64,
        failures: chosen.failures.len() as u64,
    };
    let mut pack = PackWriter::new(out, name, &declared)?;
    // What was written of each object: its size and header.
    let mut written: HashMap<ObjectId, (u64, [u8; HEADER_LEN])> = HashMap::new();
    std::thread::scope(|scope| -> Result<()> {
        // Reading and hashing objects overlaps with compressing them.
        let (tx, rx) = crossbeam_channel::bounded(READ_AHEAD);
        let ids = &ids;
        scope.spawn(move || {
            for id in ids {
                if tx.send((*id, read_object(store, id))).is_err() {
                    break;
                }
            }
        });
        for (id, read) in rx {
            let read = read.and_then(|bytes| {
                if bytes.len() as u64 > expected.get(&id).copied().unwrap_or(0) {
                    return Err(format!(
                        "left out the entries of `{}`: the object is bigger than its entries say \
                         (run `pycstore verify`)",
                        store.objects.path(&id).display()
                    ));
                }
                Ok(bytes)
            });
            match read {
                Ok(bytes) => {
                    pack.object(&id, &bytes)?;
                    let mut header = [0u8; HEADER_LEN];
                    let n = bytes.len().min(HEADER_LEN);
                    header[..n].copy_from_slice(&bytes[..n]);
                    written.insert(id, (bytes.len() as u64, header));
                    report.objects += 1;
                    report.object_bytes += bytes.len() as u64;
                }
                Err(warning) => report.warnings.push(warning),
            }
        }
        Ok(())
    })?;

    // Records written: the entries, and the bodies that repeat them.
    let mut records = 0;
    for raw in &chosen.entries {
        // A body record repeats an entry of some flavor: the entries counted
        // are those `stats` and `verify` count.
        let counted = u64::from(!raw.is_body);
        match written.get(&raw.entry.object) {
            Some(&(size, header)) if size == raw.entry.size && header == raw.entry.header => {
                pack.entry(&raw.key, &raw.value)?;
                records += 1;
                report.entries += counted;
            }
            Some(_) => {
                report.skipped_entries += counted;
                report.warnings.push(format!(
                    "left out an entry whose object `{}` does not have the size or header \
                     the index records (run `pycstore verify`)",
                    store.objects.path(&raw.entry.object).display()
                ));
            }
            // The object's warning says why.
            None => report.skipped_entries += counted,
        }
    }
    for (key, message) in &chosen.failures {
        pack.failure(key, message)?;
        report.failures += 1;
    }
    report.pack_bytes = pack.finish(records, report.failures, report.objects)?;
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// [`export`] to a file, written under a temp name beside it and renamed
/// into place when whole: a failed export leaves no partial pack behind.
pub fn export_file(store: &Store, selection: &Selection, path: &Path) -> Result<ExportReport> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(".pycstore-pack-")
        .suffix(".tmp")
        // Like any new file: 0666 less the umask.
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| with_path(e, "create a temp file in", dir))?;
    let (file, temp_path) = temp.into_parts();
    let report = export(
        store,
        selection,
        BufWriter::with_capacity(1 << 20, file),
        path,
    )?;
    temp_path
        .persist(path)
        .map_err(|e| with_path(e.error, "rename a temp file to", path))?;
    Ok(report)
}

/// Reads the index in one session and picks the selected entries.
fn choose(store: &Store, selection: &Selection, report: &mut ExportReport) -> Result<Chosen> {
    let mut linked: Option<HashSet<ObjectId>> = None;
    let mut interpreters: Vec<Interpreter> = Vec::new();
    let (entries, failures) = {
        // Probes are cached in the index: only then is a session that
        // writes needed.
        let mut index = if selection.python.is_empty() {
            store.index_reader()?
        } else {
            store.index()?
        };
        for python in &selection.python {
            interpreters.push(Interpreter::probe(python, Some(&mut index))?);
        }
        for prefix in &selection.prefixes {
            let absolute =
                std::path::absolute(prefix).map_err(|e| with_path(e, "resolve", prefix))?;
            let mut key = path_key(&absolute);
            if !key.ends_with(b"/") {
                key.push(b'/');
            }
            let links = index.scan(Family::Links, &key)?;
            if links.is_empty() {
                report.warnings.push(format!(
                    "the store records no pycs linked under `{}`",
                    absolute.display()
                ));
            }
            let set = linked.get_or_insert_with(HashSet::new);
            set.extend(
                links
                    .iter()
                    .filter_map(|(_, v)| Some(ObjectId(v.get(..32)?.try_into().ok()?))),
            );
        }
        let entries = index.scan(Family::Entries, b"")?;
        let failures = if selection.is_everything() {
            index.scan(Family::Failures, b"")?
        } else {
            Vec::new()
        };
        index.close()?;
        (entries, failures)
    };

    let total = entries.len();
    let entries: Vec<RawEntry> = entries
        .into_iter()
        .filter_map(|(k, v)| RawEntry::new(k, v))
        .collect();
    let malformed = total - entries.len();
    if malformed > 0 {
        report.skipped_entries += malformed as u64;
        report.warnings.push(format!(
            "left out {malformed} malformed index entries (run `pycstore verify`)"
        ));
    }
    let failures: Vec<_> = failures
        .into_iter()
        .filter(|(k, _)| k.len() == 32)
        .collect();

    for interpreter in &interpreters {
        if !entries
            .iter()
            .any(|raw| header_magic(raw) == interpreter.magic)
        {
            report.warnings.push(format!(
                "the store holds no pycs for `{}` ({})",
                interpreter.executable.display(),
                interpreter.cache_tag
            ));
        }
    }
    let magics: Vec<[u8; 4]> = interpreters.iter().map(|i| i.magic).collect();
    let for_python = |raw: &RawEntry| magics.is_empty() || magics.contains(&header_magic(raw));
    let entries = match &linked {
        None => entries.into_iter().filter(for_python).collect(),
        Some(linked) => {
            let linked_here =
                |raw: &RawEntry| for_python(raw) && linked.contains(&raw.entry.object);
            let keys: HashSet<CompileKey> = entries
                .iter()
                .filter(|raw| linked_here(raw))
                .map(|raw| raw.compile_key)
                .collect();
            let keep: Vec<bool> = entries
                .iter()
                .map(|raw| linked_here(raw) || (raw.is_body && keys.contains(&raw.compile_key)))
                .collect();
            entries
                .into_iter()
                .zip(keep)
                .filter_map(|(raw, keep)| keep.then_some(raw))
                .collect()
        }
    };
    Ok(Chosen { entries, failures })
}

fn header_magic(raw: &RawEntry) -> [u8; 4] {
    raw.entry.header[..4]
        .try_into()
        .expect("headers are 16 bytes")
}

/// An object's bytes, checked against its id; else a warning.
fn read_object(store: &Store, id: &ObjectId) -> std::result::Result<Vec<u8>, String> {
    let path = store.objects.path(id);
    match std::fs::read(&path) {
        Ok(bytes) if ObjectId::of(&bytes) == *id => match crate::marshal::check_pyc(&bytes) {
            Err(e) if e.is_damage() => Err(format!(
                "left out the entries of `{}`: {e} (run `pycstore verify --repair`)",
                path.display()
            )),
            _ => Ok(bytes),
        },
        Ok(_) => Err(format!(
            "left out the entries of `{}`: the object does not match its content hash \
             (run `pycstore verify --repair`)",
            path.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
            "left out the entries of `{}`: the object was removed after the index was read",
            path.display()
        )),
        Err(e) => Err(format!(
            "left out the entries of `{}`: cannot read it: {e}",
            path.display()
        )),
    }
}

/// Writes records, hashing every byte, into a zstd encoder.
struct PackWriter<W: Write> {
    out: BufWriter<zstd::Encoder<'static, Sealing<W>>>,
    hasher: blake3::Hasher,
    name: PathBuf,
}

impl<W: Write> PackWriter<W> {
    fn new(out: W, name: &Path, declared: &Declared) -> Result<Self> {
        let fail = |e| Error::Io(with_path(e, "write the pack", name));
        let mut encoder = zstd::Encoder::new(Sealing::new(out), LEVEL).map_err(fail)?;
        encoder.include_checksum(true).map_err(fail)?;
        // zstd's own threads compress while this one reads objects.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        encoder.multithread(workers as u32).map_err(fail)?;
        let mut pack = PackWriter {
            out: BufWriter::with_capacity(1 << 16, encoder),
            hasher: blake3::Hasher::new(),
            name: name.to_path_buf(),
        };
        pack.put(MAGIC)?;
        pack.put(&FORMAT_VERSION.to_le_bytes())?;
        for n in declared.fields() {
            pack.put(&n.to_le_bytes())?;
        }
        Ok(pack)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| with_path(e, "write the pack", &self.name).into())
    }

    fn object(&mut self, id: &ObjectId, bytes: &[u8]) -> Result<()> {
        self.put(&[OBJECT])?;
        self.put(&id.0)?;
        self.put(&(bytes.len() as u64).to_le_bytes())?;
        self.put(bytes)
    }

    fn entry(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.put(&[ENTRY, key.len() as u8])?;
        self.put(key)?;
        self.put(&[value.len() as u8])?;
        self.put(value)
    }

    fn failure(&mut self, key: &[u8], message: &[u8]) -> Result<()> {
        let message = &message[..message.len().min(MAX_MESSAGE_LEN as usize)];
        self.put(&[FAILURE, key.len() as u8])?;
        self.put(key)?;
        self.put(&(message.len() as u32).to_le_bytes())?;
        self.put(message)
    }

    /// Writes the trailer, ends the zstd frame, seals it and flushes;
    /// returns the pack's size.
    fn finish(mut self, entries: u64, failures: u64, objects: u64) -> Result<u64> {
        self.put(&[TRAILER])?;
        for n in [entries, failures, objects] {
            self.put(&n.to_le_bytes())?;
        }
        let digest = self.hasher.finalize();
        let name = self.name;
        let fail = |e| Error::Io(with_path(e, "write the pack", &name));
        self.out.write_all(digest.as_bytes()).map_err(fail)?;
        let encoder = self.out.into_inner().map_err(|e| fail(e.into_error()))?;
        let sealing = encoder.finish().map_err(fail)?;
        sealing.seal().map_err(fail)
    }
}

/// Adds the pack's entries, failures and objects to the store, after
/// checking all of it (see the module doc). `name` is what to call the pack
/// in messages. Entries and failures the store already has are kept; an
/// entry whose object the store lost is replaced by the pack's.
pub fn import<R: Read>(store: &Store, pack: R, name: &Path) -> Result<ImportReport> {
    let started = Instant::now();
    let mut reader = PackReader::new(pack, name)?;
    let read = reader.read_all(store)?;
    tracing::debug!(
        "read and checked the pack in {:.3}s",
        started.elapsed().as_secs_f64()
    );
    let received = read.received;
    let mut report = ImportReport {
        entries: read.entries.iter().filter(|raw| !raw.is_body).count() as u64,
        failures: read.failures.len() as u64,
        objects: (received.written.len() + received.present.len()) as u64,
        objects_present: received.present.len() as u64,
        pack_bytes: reader.compressed_bytes(),
        ..ImportReport::default()
    };

    // Every entry must name an object it can be linked from.
    let mut sizes: HashMap<ObjectId, (u64, [u8; HEADER_LEN])> = received.present.clone();
    sizes.extend(
        received
            .written
            .iter()
            .map(|(id, (size, header, _))| (*id, (*size, *header))),
    );
    for raw in &read.entries {
        let entry = &raw.entry;
        match sizes.get(&entry.object) {
            Some(&(size, header)) if size == entry.size && header == entry.header => {}
            Some(_) => {
                return Err(reader.reject(format!(
                    "an entry records a size or header that its object {} does not have",
                    entry.object.to_hex()
                )))
            }
            None if store.objects.contains(&entry.object, entry.size)
                && store.objects.header(&entry.object) == Some(entry.header) => {}
            None => {
                return Err(reader.reject(format!(
                    "an entry names the object {}, which is neither in the pack nor in the store \
                     with the size and header the entry records",
                    entry.object.to_hex()
                )))
            }
        }
    }

    // Which of its records the store lacks (a short read-only session).
    let (new_entries, new_failures) = {
        let index = store.index_reader()?;
        let mut new_entries = Vec::new();
        for raw in &read.entries {
            let kept = index
                .get(Family::Entries, &raw.key)?
                .and_then(|v| Entry::decode(&v))
                .is_some_and(|e| store.objects.contains(&e.object, e.size));
            if !kept {
                new_entries.push(raw);
            }
        }
        let mut new_failures = Vec::new();
        for (key, message) in &read.failures {
            if index.get(Family::Failures, key)?.is_none() {
                new_failures.push((key, message));
            }
        }
        (new_entries, new_failures)
    };
    tracing::debug!("looked up in {:.3}s", started.elapsed().as_secs_f64());

    // Objects first, then the entries naming them: a crash in between
    // leaves unreferenced objects (gc's to remove), never a dangling entry.
    let needed: HashSet<ObjectId> = new_entries.iter().map(|raw| raw.entry.object).collect();
    let adopt: Vec<_> = received
        .written
        .into_iter()
        .filter(|(id, _)| needed.contains(id))
        .collect();
    report.objects_added = adopt.len() as u64;
    report.object_bytes = adopt.iter().map(|(_, (size, _, _))| size).sum();
    adopt
        .into_par_iter()
        .try_for_each(|(id, (_, _, temp))| store.objects.adopt(&id, temp))?;
    tracing::debug!(
        "moved objects into place in {:.3}s",
        started.elapsed().as_secs_f64()
    );
    let mut writes = Writes::default();
    for raw in &new_entries {
        writes.put(Family::Entries, &raw.key, &raw.value);
    }
    for (key, message) in &new_failures {
        writes.put(Family::Failures, key, message);
    }
    report.entries_added = new_entries.iter().filter(|raw| !raw.is_body).count() as u64;
    report.failures_added = new_failures.len() as u64;
    if !writes.is_empty() {
        store.record(writes)?;
    }
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Everything a pack held, checked.
struct ReadPack {
    entries: Vec<RawEntry>,
    failures: Vec<(Vec<u8>, Vec<u8>)>,
    received: Received,
}

/// The pack's objects, checked against their ids.
#[derive(Default)]
struct Received {
    /// Objects written to the store's tmp area: size, header, temp file.
    written: HashMap<ObjectId, (u64, [u8; HEADER_LEN], tempfile::TempPath)>,
    /// Objects the store already had: size, header.
    present: HashMap<ObjectId, (u64, [u8; HEADER_LEN])>,
}

/// What a pack's header declares, at most; or what has arrived so far.
#[derive(Clone, Copy, Debug, Default)]
struct Declared {
    objects: u64,
    object_bytes: u64,
    entries: u64,
    failures: u64,
}

impl Declared {
    fn fields(&self) -> [u64; 4] {
        [self.objects, self.object_bytes, self.entries, self.failures]
    }
}

/// An object on its way to the storing thread, with the credits of
/// [`IN_FLIGHT`] it holds.
struct InFlight {
    id: ObjectId,
    bytes: Vec<u8>,
    credits: u64,
}

/// The storing thread of an import: checks each object's bytes against its
/// id and that it is a loadable pyc, and writes the objects the store lacks
/// to its tmp area, while the reading thread decompresses what follows.
/// Gives back the credits of each object once it is written.
fn receive(
    store: &Store,
    objects: crossbeam_channel::Receiver<InFlight>,
    credits: crossbeam_channel::Sender<()>,
    name: &Path,
) -> Result<Received> {
    let mut received = Received::default();
    let reject = |message: String| Error::Pack {
        path: name.to_path_buf(),
        message,
    };
    for InFlight {
        id,
        bytes,
        credits: held,
    } in objects
    {
        if ObjectId::of(&bytes) != id {
            return Err(reject(format!(
                "it is damaged: the object {} does not match its content hash",
                id.to_hex()
            )));
        }
        // A pack whose pycs are unloadable is damaged; one for a Python
        // whose format is unknown here is taken as it is.
        match crate::marshal::check_pyc(&bytes) {
            Err(e) if e.is_damage() => {
                return Err(reject(format!("the object {}: {e}", id.to_hex())))
            }
            Err(e) => tracing::debug!("the object {}: {e}", id.to_hex()),
            Ok(_) => {}
        }
        let size = bytes.len() as u64;
        let mut header = [0u8; HEADER_LEN];
        let n = bytes.len().min(HEADER_LEN);
        header[..n].copy_from_slice(&bytes[..n]);
        if store.objects.contains(&id, size) {
            received.present.insert(id, (size, header));
        } else {
            let temp = store.objects.write_temp(&bytes)?;
            received.written.insert(id, (size, header, temp));
        }
        drop(bytes);
        for _ in 0..held {
            // The reader stopped: nothing more arrives.
            let _ = credits.send(());
        }
    }
    Ok(received)
}

/// Reads a pack, hashing every byte up to the trailer's blake3.
struct PackReader<R: Read> {
    inner: BufReader<zstd::Decoder<'static, BufReader<Unsealing<R>>>>,
    hasher: blake3::Hasher,
    name: PathBuf,
    /// What the header declares.
    declared: Declared,
    /// What has arrived so far.
    arrived: Declared,
    /// What the records kept until the end take in memory.
    memory: u64,
}

impl<R: Read> PackReader<R> {
    fn new(pack: R, name: &Path) -> Result<Self> {
        let fail = |e| Error::Io(with_path(e, "read the pack", name));
        let mut decoder = zstd::Decoder::new(Unsealing::new(pack)).map_err(fail)?;
        decoder.window_log_max(WINDOW_LOG_MAX).map_err(fail)?;
        Ok(PackReader {
            inner: BufReader::with_capacity(1 << 16, decoder),
            hasher: blake3::Hasher::new(),
            name: name.to_path_buf(),
            declared: Declared::default(),
            arrived: Declared::default(),
            memory: 0,
        })
    }

    /// Counts `cost` bytes of memory held until the end.
    fn hold(&mut self, cost: u64) -> Result<()> {
        self.memory = self.memory.saturating_add(cost);
        if self.memory > MAX_RECORDS_MEMORY {
            return Err(self.reject(format!(
                "its entries, failures and objects need more than {} MiB of memory to import; \
                 pycstore imports at most that from one pack (export fewer entries with \
                 `--python` or `--prefix`)",
                MAX_RECORDS_MEMORY >> 20
            )));
        }
        Ok(())
    }

    fn reject(&self, message: String) -> Error {
        Error::Pack {
            path: self.name.clone(),
            message,
        }
    }

    fn unsealing(&mut self) -> &mut Unsealing<R> {
        self.inner.get_mut().get_mut().get_mut()
    }

    fn compressed_bytes(&self) -> u64 {
        self.inner.get_ref().get_ref().get_ref().count
    }

    /// Explains a failed read of `what`.
    fn broken(&self, err: io::Error, what: &str) -> Error {
        self.reject(match err.kind() {
            io::ErrorKind::UnexpectedEof if self.compressed_bytes() == 0 => "it is empty".into(),
            io::ErrorKind::UnexpectedEof => {
                format!("it ends in the middle of {what}: the pack is truncated")
            }
            _ if !self.inner.get_ref().get_ref().get_ref().is_zstd() => {
                "it is not a pycstore pack (not zstd-compressed data)".into()
            }
            _ => format!("it is damaged: zstd: {err} (reading {what})"),
        })
    }

    /// Reads exactly `buf.len()` bytes, hashing them.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.inner
            .read_exact(buf)
            .map_err(|e| self.broken(e, what))?;
        self.hasher.update(buf);
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn bytes(&mut self, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads and checks the whole pack, writing the objects the store lacks
    /// to its tmp area (on another thread).
    fn read_all(&mut self, store: &Store) -> Result<ReadPack> {
        let magic: [u8; MAGIC.len()] = self.array("the header")?;
        if &magic != MAGIC {
            return Err(self.reject("it is not a pycstore pack (wrong magic bytes)".into()));
        }
        let version = u32::from_le_bytes(self.array("the header")?);
        if version != FORMAT_VERSION {
            return Err(self.reject(format!(
                "it is in pack format version {version}; this pycstore reads version \
                 {FORMAT_VERSION}"
            )));
        }
        self.declared = Declared {
            objects: self.u64("the header")?,
            object_bytes: self.u64("the header")?,
            entries: self.u64("the header")?,
            failures: self.u64("the header")?,
        };
        // The least the declared records will take.
        let least = self
            .declared
            .objects
            .saturating_mul(OBJECT_COST)
            .saturating_add(self.declared.entries.saturating_mul(RECORD_COST))
            .saturating_add(self.declared.failures.saturating_mul(RECORD_COST));
        self.hold(least)?;
        self.memory = 0;
        let mut entries = Vec::new();
        let mut failures = Vec::new();
        let name = self.name.clone();
        let (records, received) = std::thread::scope(|scope| {
            let (tx, rx) = crossbeam_channel::bounded(STORE_AHEAD);
            let (credit_tx, credit_rx) = crossbeam_channel::bounded((IN_FLIGHT / CREDIT) as usize);
            for _ in 0..IN_FLIGHT / CREDIT {
                // The channel has room for every credit.
                let _ = credit_tx.send(());
            }
            let storing = scope.spawn(|| receive(store, rx, credit_tx, &name));
            let records = self.records(&tx, &credit_rx, &mut entries, &mut failures);
            drop(tx);
            (
                records,
                storing.join().expect("the storing thread does not panic"),
            )
        });
        // The storing thread's error is about an earlier byte of the pack.
        let received = received?;
        records?;
        Ok(ReadPack {
            entries,
            failures,
            received,
        })
    }

    /// Reads the records and the trailer, sending objects to the storing
    /// thread.
    fn records(
        &mut self,
        objects: &crossbeam_channel::Sender<InFlight>,
        credits: &crossbeam_channel::Receiver<()>,
        entries: &mut Vec<RawEntry>,
        failures: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<()> {
        let mut seen: HashSet<ObjectId> = HashSet::new();
        // The storing thread stopped; its error says why.
        let stopped = |reader: &Self| reader.reject("the objects could not be stored".into());
        loop {
            let [tag] = self.array("a record")?;
            match tag {
                OBJECT => {
                    let (id, len) = self.object_head(&mut seen)?;
                    // Wait until the objects before it are stored, so that
                    // at most IN_FLIGHT bytes of them are held.
                    let held = len.div_ceil(CREDIT).max(1);
                    for _ in 0..held {
                        credits.recv().map_err(|_| stopped(self))?;
                    }
                    let bytes = self.bytes(len as usize, "an object")?;
                    let sent = objects.send(InFlight {
                        id,
                        bytes,
                        credits: held,
                    });
                    sent.map_err(|_| stopped(self))?;
                }
                ENTRY => {
                    self.count_record(ENTRY)?;
                    let [len] = self.array("an entry")?;
                    let key = self.bytes(len.into(), "an entry")?;
                    let [len] = self.array("an entry")?;
                    let value = self.bytes(len.into(), "an entry")?;
                    self.hold(RECORD_COST + (key.len() + value.len()) as u64)?;
                    let raw = RawEntry::new(key, value)
                        .ok_or_else(|| self.reject("it is damaged: a malformed entry".into()))?;
                    entries.push(raw);
                }
                FAILURE => {
                    self.count_record(FAILURE)?;
                    let [len] = self.array("a failure")?;
                    if len != 32 {
                        return Err(self.reject("it is damaged: a malformed failure".into()));
                    }
                    let key = self.bytes(32, "a failure")?;
                    let len = u32::from_le_bytes(self.array("a failure")?);
                    if len > MAX_MESSAGE_LEN {
                        return Err(
                            self.reject(format!("it is damaged: a failure message of {len} bytes"))
                        );
                    }
                    self.hold(RECORD_COST + 32 + u64::from(len))?;
                    let message = self.bytes(len as usize, "a failure")?;
                    failures.push((key, message));
                }
                TRAILER => break,
                other => {
                    return Err(
                        self.reject(format!("it is damaged: unknown record type 0x{other:02x}"))
                    )
                }
            }
        }
        self.trailer([
            entries.len() as u64,
            failures.len() as u64,
            seen.len() as u64,
        ])
    }

    /// Counts an entry or failure record against what the header declares.
    fn count_record(&mut self, tag: u8) -> Result<()> {
        let (arrived, declared, what) = if tag == ENTRY {
            (&mut self.arrived.entries, self.declared.entries, "entries")
        } else {
            (
                &mut self.arrived.failures,
                self.declared.failures,
                "failures",
            )
        };
        *arrived += 1;
        if *arrived > declared {
            return Err(self.reject(format!(
                "it is damaged: it holds more {what} than the {declared} its header declares"
            )));
        }
        Ok(())
    }

    /// Reads the head of an object record (after its tag), and checks its
    /// length against the limits and what the header declares, before any
    /// of its bytes are read.
    fn object_head(&mut self, seen: &mut HashSet<ObjectId>) -> Result<(ObjectId, u64)> {
        let id = ObjectId(self.array("an object")?);
        let len = self.u64("an object")?;
        self.arrived.objects += 1;
        if self.arrived.objects > self.declared.objects {
            return Err(self.reject(format!(
                "it is damaged: it holds more objects than the {} its header declares",
                self.declared.objects
            )));
        }
        if len > MAX_OBJECT_LEN {
            return Err(self.reject(format!(
                "it is damaged: the object {} is {len} bytes long, more than the {} MiB \
                 pycstore accepts for a pyc",
                id.to_hex(),
                MAX_OBJECT_LEN >> 20
            )));
        }
        let total = self.arrived.object_bytes.saturating_add(len);
        if total > self.declared.object_bytes {
            return Err(self.reject(format!(
                "it is damaged: its objects exceed the {} bytes its header declares \
                 (the object {} of {len} bytes comes after {} bytes)",
                self.declared.object_bytes,
                id.to_hex(),
                self.arrived.object_bytes
            )));
        }
        self.arrived.object_bytes = total;
        if !seen.insert(id) {
            return Err(self.reject(format!(
                "it is damaged: the object {} appears twice",
                id.to_hex()
            )));
        }
        self.hold(OBJECT_COST)?;
        Ok((id, len))
    }

    /// Checks the trailer's counts (against the records `found`) and blake3,
    /// and the seal after it.
    fn trailer(&mut self, found: [u64; 3]) -> Result<()> {
        let counts = [
            self.u64("the trailer")?,
            self.u64("the trailer")?,
            self.u64("the trailer")?,
        ];
        let expected = self.hasher.finalize();
        let mut digest = [0u8; 32];
        self.inner
            .read_exact(&mut digest)
            .map_err(|e| self.broken(e, "the trailer"))?;
        if digest != *expected.as_bytes() {
            return Err(
                self.reject("it is damaged: its checksum does not match its contents".into())
            );
        }
        if counts != found {
            return Err(self.reject(format!(
                "it is damaged: its trailer counts {} entries, {} failures and {} objects, \
                 it holds {}, {} and {}",
                counts[0], counts[1], counts[2], found[0], found[1], found[2]
            )));
        }
        // Reading to the end makes zstd check its frame checksum, and brings
        // the seal (which zstd skips) to the unsealing reader.
        let mut rest = [0u8; 1];
        loop {
            match self.inner.read(&mut rest) {
                Ok(0) => break,
                Ok(_) => return Err(self.reject("it has unexpected data after its trailer".into())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.broken(e, "the seal")),
            }
        }
        let sealed = self
            .unsealing()
            .check()
            .map_err(|e| self.broken(e, "the seal"))?;
        match sealed {
            Seal::Valid => Ok(()),
            Seal::Missing => {
                Err(self.reject("it ends without its seal: the pack is truncated".into()))
            }
            Seal::Wrong => {
                Err(self.reject("it is damaged: its seal does not match its bytes".into()))
            }
        }
    }
}

/// Counts and hashes the compressed bytes written, for the seal.
struct Sealing<W> {
    inner: W,
    hasher: blake3::Hasher,
    count: u64,
}

impl<W: Write> Sealing<W> {
    fn new(inner: W) -> Self {
        Sealing {
            inner,
            hasher: blake3::Hasher::new(),
            count: 0,
        }
    }

    /// Writes the seal after everything written so far; returns the total size.
    fn seal(mut self) -> io::Result<u64> {
        let mut seal = Vec::with_capacity(SEAL_LEN);
        seal.extend_from_slice(&SEAL_MAGIC.to_le_bytes());
        seal.extend_from_slice(&32u32.to_le_bytes());
        seal.extend_from_slice(self.hasher.finalize().as_bytes());
        self.inner.write_all(&seal)?;
        self.inner.flush()?;
        Ok(self.count + SEAL_LEN as u64)
    }
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What the last bytes of a pack say.
enum Seal {
    Valid,
    Missing,
    Wrong,
}

/// Counts and hashes the compressed bytes read, holding back the last
/// [`SEAL_LEN`] (which may be the seal) from the hash.
struct Unsealing<R> {
    inner: R,
    hasher: blake3::Hasher,
    /// The last bytes read, not yet hashed.
    tail: Vec<u8>,
    /// The first bytes read.
    head: Vec<u8>,
    count: u64,
}

impl<R: Read> Unsealing<R> {
    fn new(inner: R) -> Self {
        Unsealing {
            inner,
            hasher: blake3::Hasher::new(),
            tail: Vec::with_capacity(2 * SEAL_LEN),
            head: Vec::with_capacity(4),
            count: 0,
        }
    }

    /// Whether the data starts like a zstd frame.
    fn is_zstd(&self) -> bool {
        self.head == ZSTD_MAGIC.to_le_bytes()
    }

    /// Reads what is left (nothing, when the pack is whole) and checks the
    /// seal against the bytes before it.
    fn check(&mut self) -> io::Result<Seal> {
        io::copy(self, &mut io::sink())?;
        let seal = &self.tail;
        if seal.len() != SEAL_LEN
            || seal[..4] != SEAL_MAGIC.to_le_bytes()
            || seal[4..8] != 32u32.to_le_bytes()
        {
            return Ok(Seal::Missing);
        }
        Ok(if seal[8..] == *self.hasher.finalize().as_bytes() {
            Seal::Valid
        } else {
            Seal::Wrong
        })
    }
}

impl<R: Read> Read for Unsealing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        let new = &buf[..n];
        let more = new.len().min(4 - self.head.len());
        self.head.extend_from_slice(&new[..more]);
        if n >= SEAL_LEN {
            self.hasher.update(&self.tail);
            self.hasher.update(&new[..n - SEAL_LEN]);
            self.tail.clear();
            self.tail.extend_from_slice(&new[n - SEAL_LEN..]);
        } else {
            self.tail.extend_from_slice(new);
            let over = self.tail.len().saturating_sub(SEAL_LEN);
            self.hasher.update(&self.tail[..over]);
            self.tail.drain(..over);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::LockMode;
    use crate::pyc::Flavor;

    /// A store holding two objects, an entry and a body for each, and a failure.
    fn store_with_entries(root: &Path) -> Store {
        let store = Store::open_with(root, LockMode::Shared).unwrap();
        let mut writes = Writes::default();
        for (i, name) in ["first.py", "second.py"].into_iter().enumerate() {
            let mut bytes = crate::marshal::test_pyc(name);
            bytes[8..16].copy_from_slice(&[i as u8; 8]);
            let object = store.objects.put(&bytes).unwrap();
            let entry = Entry {
                object,
                size: bytes.len() as u64,
                header: bytes[..16].try_into().unwrap(),
            };
            let key = CompileKey([i as u8 + 1; 32]);
            writes.entry(&key, EntrySlot::Hashed(Flavor::CheckedHash), &entry);
            writes.entry(&key, EntrySlot::Body, &entry);
        }
        writes.failure(&CompileKey([9; 32]), "SyntaxError: invalid syntax");
        store.index().unwrap().apply(writes).unwrap();
        store
    }

    fn pack_of(store: &Store) -> Vec<u8> {
        let mut pack = Vec::new();
        let report = export(store, &Selection::default(), &mut pack, Path::new("p")).unwrap();
        // Two entries (their bodies are written but not counted, as in
        // `stats`), one failure, two objects.
        assert_eq!((report.entries, report.failures, report.objects), (2, 1, 2));
        assert_eq!(report.pack_bytes, pack.len() as u64);
        pack
    }

    /// Every file of a directory tree with its bytes.
    fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = walkdir::WalkDir::new(root)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn round_trip_and_again() {
        let dir = tempfile::tempdir().unwrap();
        let pack = pack_of(&store_with_entries(&dir.path().join("a")));
        let b = Store::open(&dir.path().join("b")).unwrap();
        let report = import(&b, &pack[..], Path::new("p")).unwrap();
        assert_eq!(
            (
                report.entries_added,
                report.failures_added,
                report.objects_added
            ),
            (2, 1, 2)
        );
        let index = b.index().unwrap();
        // The two entries and their two bodies.
        assert_eq!(index.scan(Family::Entries, b"").unwrap().len(), 4);
        assert!(index.failure(&CompileKey([9; 32])).unwrap().is_some());
        drop(index);
        // Twice: nothing new.
        let report = import(&b, &pack[..], Path::new("p")).unwrap();
        assert_eq!(
            (
                report.entries_added,
                report.objects_added,
                report.objects_present
            ),
            (0, 0, 2)
        );
    }

    #[test]
    fn every_damage_is_rejected_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pack = pack_of(&store_with_entries(&dir.path().join("a")));
        let b_root = dir.path().join("b");
        let b = Store::open(&b_root).unwrap();
        let before = snapshot(&b_root);
        let mut damaged: Vec<(String, Vec<u8>)> = Vec::new();
        for cut in [0, 1, pack.len() / 2, pack.len() - 1] {
            damaged.push((format!("cut at {cut}"), pack[..cut].to_vec()));
        }
        for at in 0..pack.len() {
            let mut p = pack.clone();
            p[at] ^= 0x40;
            damaged.push((format!("byte {at} flipped"), p));
        }
        let mut trailing = pack.clone();
        trailing.extend_from_slice(&pack);
        damaged.push(("two packs in one".into(), trailing));
        damaged.push(("garbage".into(), b"not a pack at all".repeat(10)));
        let mut plain = Vec::new();
        plain.extend_from_slice(b"pycstore pack\x00\x07\x00\x00\x00");
        damaged.push(("version 7".into(), zstd::encode_all(&plain[..], 3).unwrap()));
        for (what, p) in damaged {
            match import(&b, &p[..], Path::new("p")) {
                Err(Error::Pack { message, .. }) => assert!(!message.is_empty()),
                other => panic!("{what}: {other:?}"),
            }
            assert!(before == snapshot(&b_root), "{what} changed the store");
        }
    }

    #[test]
    fn an_entry_without_its_object_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let a = store_with_entries(&dir.path().join("a"));
        let mut writes = Writes::default();
        let entry = Entry {
            object: ObjectId([5; 32]),
            size: 20,
            header: [0; 16],
        };
        writes.entry(
            &CompileKey([7; 32]),
            EntrySlot::Hashed(Flavor::CheckedHash),
            &entry,
        );
        a.index().unwrap().apply(writes).unwrap();
        // The exporter leaves it out (its object is missing)...
        let mut pack = Vec::new();
        let report = export(&a, &Selection::default(), &mut pack, Path::new("p")).unwrap();
        assert_eq!((report.entries, report.skipped_entries), (2, 1));
        // ...and a pack that has it anyway is refused.
        let mut key = vec![7; 32];
        key.push(Flavor::CheckedHash.tag());
        let pack = pack_of_an_entry(&key, &entry);
        let b = Store::open(&dir.path().join("b")).unwrap();
        match import(&b, &pack[..], Path::new("p")) {
            Err(Error::Pack { message, .. }) => {
                assert!(
                    message.contains("neither in the pack nor in the store"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Nor is one naming an object the store has, with its size but
        // another header: the store is left as it was.
        let stored = a
            .index()
            .unwrap()
            .entry(&CompileKey([1; 32]), EntrySlot::Body)
            .unwrap()
            .unwrap();
        for (header, kept) in [
            ([7u8; 16], false),
            (a.objects.header(&stored.object).unwrap(), true),
        ] {
            let pack = pack_of_an_entry(&key, &Entry { header, ..stored });
            let before = snapshot(&dir.path().join("a"));
            match import(&a, &pack[..], Path::new("p")) {
                Ok(report) if kept => assert_eq!(report.entries_added, 1),
                Err(Error::Pack { message, .. }) if !kept => {
                    assert!(message.contains("size and header"), "{message}");
                    assert!(
                        snapshot(&dir.path().join("a")) == before,
                        "the store changed"
                    );
                }
                other => panic!("{header:?}: {other:?}"),
            }
        }
    }

    /// A pack holding the one entry `entry` under the index key `key`.
    fn pack_of_an_entry(key: &[u8], entry: &Entry) -> Vec<u8> {
        let mut value = entry.object.0.to_vec();
        value.extend_from_slice(&entry.size.to_le_bytes());
        value.extend_from_slice(&entry.header);
        let mut pack = Vec::new();
        let declared = Declared {
            entries: 1,
            ..Declared::default()
        };
        let mut w = PackWriter::new(&mut pack, Path::new("p"), &declared).unwrap();
        w.entry(key, &value).unwrap();
        w.finish(1, 0, 0).unwrap();
        pack
    }

    /// A pack of one object record whose length field says `len`, followed
    /// by `bytes`, under a header declaring `declared`.
    fn pack_with(declared: &Declared, records: &[(ObjectId, u64, Vec<u8>)]) -> Vec<u8> {
        let mut pack = Vec::new();
        let mut w = PackWriter::new(&mut pack, Path::new("p"), declared).unwrap();
        for (id, len, bytes) in records {
            w.put(&[OBJECT]).unwrap();
            w.put(&id.0).unwrap();
            w.put(&len.to_le_bytes()).unwrap();
            w.put(bytes).unwrap();
        }
        w.finish(0, 0, records.len() as u64).unwrap();
        pack
    }

    fn rejected(store: &Store, pack: &[u8]) -> String {
        match import(store, pack, Path::new("p")) {
            Err(Error::Pack { message, .. }) => message,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lengths_beyond_the_limits_or_the_header_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("b");
        let store = Store::open(&root).unwrap();
        let before = snapshot(&root);
        let pyc = crate::marshal::test_pyc("m.py");
        let id = ObjectId::of(&pyc);
        let len = pyc.len() as u64;
        let declared = |objects, object_bytes| Declared {
            objects,
            object_bytes,
            ..Declared::default()
        };
        let cases = [
            // 1 GiB declared and announced, nothing behind it.
            (
                pack_with(&declared(1, 1 << 30), &[(id, 1 << 30, Vec::new())]),
                "more than the 64 MiB",
            ),
            // More bytes than declared.
            (
                pack_with(&declared(1, len - 1), &[(id, len, pyc.clone())]),
                "exceed the",
            ),
            // More objects than declared.
            (
                pack_with(
                    &declared(1, 2 * len),
                    &[
                        (id, len, pyc.clone()),
                        (ObjectId([1; 32]), len, pyc.clone()),
                    ],
                ),
                "more objects than the 1",
            ),
            // More records than any import holds.
            (
                pack_with(&declared(u64::MAX / 1024, 0), &[]),
                "need more than 256 MiB",
            ),
        ];
        for (pack, says) in cases {
            let message = rejected(&store, &pack);
            assert!(message.contains(says), "{says}: {message}");
            assert!(before == snapshot(&root));
        }
    }

    #[test]
    fn an_object_python_cannot_load_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("b");
        let store = Store::open(&root).unwrap();
        let before = snapshot(&root);
        let mut garbage = crate::marshal::test_pyc("m.py")[..16].to_vec();
        garbage.extend_from_slice(b"c\xde\xad garbage after the code type byte");
        let id = ObjectId::of(&garbage);
        let len = garbage.len() as u64;
        let pack = pack_with(
            &Declared {
                objects: 1,
                object_bytes: len,
                ..Declared::default()
            },
            &[(id, len, garbage)],
        );
        let message = rejected(&store, &pack);
        assert!(
            message.contains(&id.to_hex().to_string()) && message.contains("not a loadable"),
            "{message}"
        );
        assert!(before == snapshot(&root));
    }
}
