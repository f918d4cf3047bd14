//! `verify`: check every object against its name and the index against the
//! objects, both ways; with `repair`, drop what is broken so the next
//! `link` compiles it again.
//!
//! What is checked:
//!
//! - each object is a regular file whose blake3 is its name (a flipped
//!   bit, a truncation or an append changes the hash), owned by the store's
//!   owner (in a group store, its group), mode 0444 or 0400 (0440 in a
//!   group store): a hardlinked object is the same inode in every prefix,
//!   so a `chown -R` or `chmod` of one prefix changes it for all;
//! - each shard directory of the objects bucket is a directory owned by
//!   the store's owner, writable by no one else;
//! - and whose body is one code object Python can load
//!   ([`crate::marshal`]): a valid header and garbage hashes fine;
//! - each index entry names an object that exists, with the entry's size
//!   and header (the first 16 bytes);
//! - objects no entry names are counted (orphans): not an error, a crash
//!   between writing an object and recording it leaves one;
//! - anything else in the objects bucket (strays) is reported;
//! - every pyc pycstore recorded placing is looked at: one sharing the
//!   inode of a damaged object, or holding its damaged bytes, is damaged;
//!   one still hard linked to an earlier inode of its object (the object
//!   was rewritten since) whose bytes no longer match is damaged; one
//!   sharing the inode of an object whose owner or mode changed is exposed
//!   to whoever could change it.
//!
//! The index is read whole (every record of every column family, block
//! checksums verified); a damaged one is reported with RocksDB's message.
//!
//! What `repair` does (under the exclusive store lock): a damaged index is
//! first rebuilt beside the old one from what can still be read of it and
//! from entries derived again from the pycs linked from the store, then
//! swapped in atomically; the damaged one is kept as
//! `index-v2.broken-<unix time>` (see `index::rebuild`). Without
//! room for that on the disk it fails before changing anything. Damaged,
//! unreadable and stray files are removed, with every entry that names a
//! removed or missing object and their use times; entries that disagree
//! with their object are removed; a good object whose owner or mode
//! changed is given a fresh inode with the right ones (its bytes checked
//! against its name first); orphans are removed (unless the index was just
//! rebuilt or one is set aside: their entries may be what it lost);
//! recorded pycs found damaged or exposed are removed from their prefix
//! when they still are that inode (or those bytes), through directory
//! descriptors that never follow a symlink, so Python compiles them again
//! or the next `link` puts good ones back. Entries go before the objects,
//! as in `gc`. On a full disk a read-only look finds a healthy index
//! healthy, and a repair with nothing to fix writes nothing.

use std::collections::{hash_map, HashMap};
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use serde::Serialize;

use crate::index::rebuild::{self, Readout};
use crate::index::{counts_as_entry, Entry, EntrySlot, Family, Writes};
use crate::key::{CompileKey, SourceDigest, COMPILE_FLAGS_DEFAULT};
use crate::objects::{ObjectId, Objects};
use crate::pyc::{self, Flavor, HashVariant, HEADER_LEN};
use crate::tree::{hash_at, open_parent, read_at, remove_placed, Expect};
use crate::trust::Owner;
use crate::util::{hex, with_path, PathContext, PathError};
use crate::{Result, Store};

/// What `verify` should do.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyOptions {
    /// Repair what is broken; needs the store opened with
    /// [`LockMode::Exclusive`](crate::lock::LockMode).
    pub repair: bool,
}

/// Counters of one `verify` run.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct VerifyStats {
    /// Objects checked.
    pub objects: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Index entries checked.
    pub entries: u64,
    /// Good objects no index entry names (not an error; `gc` removes them).
    pub orphans: u64,
    /// Objects whose bytes do not hash to their name, or are not a pyc
    /// Python can load.
    pub corrupt: u64,
    /// Good objects whose mode is not an object's (0444, or 0400; 0440 in a
    /// group store).
    pub bad_permissions: u64,
    /// Good objects owned by someone other than the store's owner (in a
    /// group store, by another group), and shard directories likewise.
    pub bad_owner: u64,
    /// Objects that could not be read.
    pub unreadable: u64,
    /// Names in the objects bucket that are not pyc files pycstore wrote.
    pub strays: u64,
    /// Objects named by index entries that do not exist.
    pub missing_objects: u64,
    /// Entries whose size or header differs from their (good) object.
    pub mismatched_entries: u64,
    /// Entries that cannot be decoded.
    pub malformed_entries: u64,
    /// pycs pycstore placed in prefixes that hold damaged bytes: sharing
    /// the inode of a damaged object, holding its bytes, or hard linked to
    /// an earlier inode of their object that was damaged since.
    pub damaged_links: u64,
    /// pycs pycstore placed in prefixes sharing the inode of an object (or
    /// of an earlier inode of it) whose owner or mode changed: whoever owns
    /// it can change the pyc in every prefix holding it.
    pub exposed_links: u64,
}

/// What `repair` changed.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Repairs {
    /// Damaged, unreadable and stray files removed from the objects bucket.
    pub objects_removed: u64,
    /// Orphaned objects removed.
    pub orphans_removed: u64,
    /// Index entries removed.
    pub entries_removed: u64,
    /// Objects given a fresh inode with an object's mode (or made readable
    /// again).
    pub permissions_fixed: u64,
    /// Objects given a fresh inode owned by the store's owner, and shard
    /// directories given back to it.
    pub owners_fixed: u64,
    /// Damaged or exposed pycs removed from prefixes.
    pub links_removed: u64,
}

/// The state of the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IndexState {
    /// It opened.
    Ok,
    /// It cannot be read whole; `repair` was not asked for.
    Damaged,
    /// It was rebuilt from what could be read of it (and entries derived
    /// again from the pycs linked from the store); what was lost is
    /// compiled again. The damaged one was set aside.
    Repaired,
    /// Nothing could be read of it: set aside and replaced by an empty index.
    Rebuilt,
}

/// What kind of problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// The index cannot be opened.
    Index,
    /// An object's bytes do not hash to its name, or are not a pyc Python
    /// can load.
    Corrupt,
    /// A good object whose mode is not an object's.
    Permissions,
    /// A good object, or a shard directory, owned by someone other than the
    /// store's owner.
    Owner,
    /// An object that could not be read.
    Unreadable,
    /// Something in the objects bucket that pycstore did not write there.
    Stray,
    /// An entry names an object that does not exist.
    MissingObject,
    /// An entry's size or header differs from its object.
    MismatchedEntry,
    /// An entry that cannot be decoded.
    MalformedEntry,
    /// A pyc pycstore placed in a prefix that holds damaged bytes.
    DamagedLink,
    /// A pyc pycstore placed in a prefix that shares the inode of an object
    /// whose owner or mode changed.
    ExposedLink,
}

/// One problem, and whether `repair` fixed it.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// The file concerned (the object, the pyc, the index).
    pub path: PathBuf,
    /// What is wrong, and what repair did about it.
    pub message: String,
    /// Whether it was repaired.
    pub repaired: bool,
}

/// The outcome of `verify`.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// The counters.
    #[serde(flatten)]
    pub stats: VerifyStats,
    /// The state of the index.
    pub index: IndexState,
    /// Where the damaged index was moved, when it had to be rebuilt.
    pub index_moved_to: Option<PathBuf>,
    /// Indexes set aside by repairs (`index-v2.*`, `index-v1.*`): while one exists,
    /// orphaned objects are kept, since it may name them.
    pub set_aside_indexes: Vec<PathBuf>,
    /// What `repair` changed (absent without it).
    pub repairs: Option<Repairs>,
    /// Every problem found, in the order found.
    pub problems: Vec<Problem>,
    /// Wall time in seconds.
    pub elapsed_seconds: f64,
}

impl VerifyReport {
    /// Whether anything is still broken: a problem found and not repaired.
    pub fn broken(&self) -> bool {
        self.problems.iter().any(|p| !p.repaired)
    }
}

/// What reading one object found.
#[derive(Debug)]
enum State {
    Good,
    Corrupt,
    /// Hashes to its name but Python cannot load it: why.
    Unloadable(String),
    NotAFile(&'static str),
    Unreadable(PathError),
}

/// One object as checked.
#[derive(Debug)]
struct Checked {
    state: State,
    size: u64,
    head: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Owner, group and mode are an object's.
    meta_ok: bool,
    /// The hash of the bytes found, when they are not the object's.
    found: Option<ObjectId>,
    nlink: u64,
    dev: u64,
    ino: u64,
}

impl Checked {
    fn good(&self) -> bool {
        matches!(self.state, State::Good)
    }

    /// An object that could not even be looked at.
    fn unreadable(err: PathError) -> Checked {
        Checked {
            state: State::Unreadable(err),
            size: 0,
            head: Vec::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            meta_ok: true,
            found: None,
            nlink: 1,
            dev: 0,
            ino: 0,
        }
    }
}

/// Every object as checked, by id.
type Checks = HashMap<ObjectId, Checked>;

/// The objects index entries name, each with the sizes its entries say.
type Named = HashMap<ObjectId, Vec<u64>>;

/// The families of the index `verify` looks at.
const INDEX_FAMILIES: [Family; 2] = [Family::Entries, Family::Links];

/// Reads and hashes the object at `path`; `None` when it does not exist.
fn check_object(objects: &Objects, id: &ObjectId, path: &Path) -> Option<Checked> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Checked::unreadable(PathError::new(e, "stat", path))),
    };
    let mut checked = Checked {
        state: State::Good,
        size: meta.len(),
        head: Vec::new(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        meta_ok: objects.metadata_ok(&meta),
        found: None,
        nlink: meta.nlink(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let kind = meta.file_type();
    if !kind.is_file() {
        checked.state = State::NotAFile(if kind.is_symlink() {
            "a symlink"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        });
        return Some(checked);
    }
    let read = crate::link::open_no_follow(path).and_then(|mut file| {
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map(|_| bytes)
    });
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(e) => {
            checked.state = State::Unreadable(PathError::new(e, "read", path));
            return Some(checked);
        }
    };
    checked.size = bytes.len() as u64;
    checked.head = bytes[..bytes.len().min(HEADER_LEN)].to_vec();
    let found = ObjectId::of(&bytes);
    if found != *id {
        checked.state = State::Corrupt;
        checked.found = Some(found);
    } else {
        match crate::marshal::check_pyc(&bytes) {
            Err(e) if e.is_damage() => checked.state = State::Unloadable(e.to_string()),
            Err(e) => tracing::debug!("`{}`: {e}", path.display()),
            Ok(_) => {}
        }
    }
    Some(checked)
}

/// Everything a run found, in the order found, with what a repair is to do
/// about each: the steps of [`verify`] add to it, the repair works through
/// it.
#[derive(Default)]
struct Findings {
    stats: VerifyStats,
    repairs: Repairs,
    problems: Vec<Problem>,
    /// Index records to delete: the entries that go, and the use times of
    /// objects that go.
    writes: Writes,
    /// How many of `writes` are entries.
    entries_dropped: u64,
    /// Files to remove from the objects bucket, each with its problem.
    remove: Vec<(PathBuf, usize)>,
    /// Good objects to give a fresh inode, each with its problem.
    refresh: Vec<(ObjectId, usize)>,
    /// Shard directories to give back to the store's owner, each with its
    /// problem.
    shards: Vec<(PathBuf, usize)>,
    /// Recorded pycs to remove from their prefix, each with its problem and
    /// what it must still be.
    unlink: Vec<(PathBuf, usize, Expect)>,
    /// Orphaned objects to remove.
    orphans: Vec<ObjectId>,
}

impl Findings {
    /// Adds a problem, not repaired (yet); returns its place.
    fn problem(&mut self, kind: ProblemKind, path: PathBuf, message: String) -> usize {
        self.problems.push(Problem {
            kind,
            path,
            message,
            repaired: false,
        });
        self.problems.len() - 1
    }

    /// Marks the index entry `key` to go (a body record goes uncounted:
    /// it repeats an entry, see [`counts_as_entry`]).
    fn drop_entry(&mut self, key: &[u8]) {
        self.writes.delete(Family::Entries, key);
        self.entries_dropped += u64::from(counts_as_entry(key));
    }
}

/// What the index gave.
struct IndexScan {
    state: IndexState,
    /// Where a rebuild moved the damaged index.
    moved_to: Option<PathBuf>,
    /// Indexes set aside by repairs (this run's included).
    set_aside: Vec<PathBuf>,
    /// Every entry's key, with the entry unless it cannot be decoded.
    entries: Vec<(Vec<u8>, Option<Entry>)>,
    /// Every pyc recorded as placed, with its object.
    links: Vec<(PathBuf, ObjectId)>,
}

/// Runs `verify` (and with `options.repair`, repairs) on a store: each step
/// adds what it finds to one `Findings`, which the repair then works
/// through.
pub fn verify(store: &Store, options: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut found = Findings::default();
    let (mut objects, strays) = check_objects(store, options.repair, &mut found)?;
    let index = scan_index(store, options.repair, &objects, &mut found)?;
    let named = cross_check(store, &index.entries, &mut objects, &mut found);
    judge_objects(store, &objects, &named, &index, &mut found);
    report_strays(&strays, &mut found);
    check_shards(store, &mut found);
    check_links(store, &index.links, &objects, &mut found);
    if options.repair {
        // A flush that failed leaves the index's repairs in the write-ahead
        // log, for the next session: the files are repaired all the same
        // (the pycs whose records went would otherwise stay, no longer
        // recorded), and the error is returned after.
        let unflushed = repair_index(store, &mut found)?;
        repair_files(store, &mut found);
        if let Some(e) = unflushed {
            return Err(e);
        }
    }
    Ok(VerifyReport {
        stats: found.stats,
        index: index.state,
        index_moved_to: index.moved_to,
        set_aside_indexes: index.set_aside,
        repairs: options.repair.then_some(found.repairs),
        problems: found.problems,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Step 1: reads and hashes every object, in parallel. With `repair`, an
/// object that could not be read is made read-only and read again: it may
/// be good underneath. Returns the objects, and the strays of the listing.
fn check_objects(
    store: &Store,
    repair: bool,
    found: &mut Findings,
) -> Result<(Checks, Vec<PathBuf>)> {
    let listing = store.objects.list()?;
    let mut objects: Checks = listing
        .objects
        .par_iter()
        .filter_map(|id| {
            check_object(&store.objects, id, &store.objects.path(id)).map(|c| (*id, c))
        })
        .collect();
    if repair {
        for (id, checked) in objects.iter_mut() {
            if matches!(checked.state, State::Unreadable(_)) {
                read_again(store, id, checked, found);
            }
        }
    }
    found.stats.objects = objects.len() as u64;
    found.stats.bytes = objects.values().map(|c| c.size).sum();
    Ok((objects, listing.strays))
}

/// Makes an object that could not be read read-only (0444) and checks it
/// again; good underneath, that is a permission repaired.
fn read_again(store: &Store, id: &ObjectId, checked: &mut Checked, found: &mut Findings) {
    let path = store.objects.path(id);
    if let Ok((dir, name)) = beneath_store(store.objects.dir(), &path) {
        chmod_file_at(&dir, &name, 0o444);
    }
    let Some(again) = check_object(&store.objects, id, &path) else {
        return;
    };
    if again.good() {
        found.stats.unreadable += 1;
        found.repairs.permissions_fixed += 1;
        let message = format!(
            "could not be read (mode {:04o}); made it read-only (0444)",
            checked.mode
        );
        let at = found.problem(ProblemKind::Unreadable, path, message);
        found.problems[at].repaired = true;
    }
    *checked = again;
}

/// Step 2: reads the index whole, with its checksums verified (a damaged
/// one is rebuilt first with `repair`): every entry, and every pyc recorded
/// as placed.
fn scan_index(
    store: &Store,
    repair: bool,
    objects: &Checks,
    found: &mut Findings,
) -> Result<IndexScan> {
    let path = store.index_path();
    let readout = rebuild::read_all(&path, &INDEX_FAMILIES)?;
    let (readout, state, moved_to) = if readout.damage.is_empty() {
        (readout, IndexState::Ok, None)
    } else if repair {
        rebuild_index(store, readout, objects, found)?
    } else {
        let cause = readout.damage.join("; ");
        tracing::debug!("the index at `{}` is damaged: {cause}", path.display());
        let message = format!(
            "the index is damaged: {cause}; run `pycstore verify --repair` to rebuild it from \
             what can be read (objects are kept)"
        );
        found.problem(ProblemKind::Index, path, message);
        (readout, IndexState::Damaged, None)
    };
    let entries: Vec<(Vec<u8>, Option<Entry>)> = readout
        .family(Family::Entries)
        .map(|(key, value)| (key.to_vec(), Entry::decode(value)))
        .collect();
    found.stats.entries = entries
        .iter()
        .filter(|(key, _)| counts_as_entry(key))
        .count() as u64;
    Ok(IndexScan {
        state,
        moved_to,
        set_aside: rebuild::set_aside_indexes(store.root()),
        entries,
        links: recorded_links(&readout),
    })
}

/// Rebuilds the index `damaged` was read from, from what can be read of it
/// (keeping it aside), reports it repaired, and reads the new one. Returns
/// what the new one holds, its state, and where the damaged one went.
fn rebuild_index(
    store: &Store,
    damaged: Readout,
    objects: &Checks,
    found: &mut Findings,
) -> Result<(Readout, IndexState, Option<PathBuf>)> {
    let path = store.index_path();
    let cause = damaged.damage.join("; ");
    tracing::debug!("the index at `{}` is damaged: {cause}", path.display());
    drop(damaged);
    let rebuilt = rebuild::rebuild(&path, |salvaged| derive_entries(objects, salvaged))?;
    let state = if rebuilt.kept + rebuilt.derived > 0 {
        IndexState::Repaired
    } else {
        IndexState::Rebuilt
    };
    let mut message = format!(
        "the index is damaged: {cause}; rebuilt it from what could be read: {} kept, {} derived \
         again from the pycs linked from the store (what was lost, the next `pycstore link` \
         compiles again)",
        plural(rebuilt.kept, "record", "records"),
        plural(rebuilt.derived, "entry", "entries"),
    );
    if let Some(aside) = &rebuilt.set_aside {
        message.push_str(&format!(
            "; the damaged index is kept at `{}` (orphaned objects are kept while it exists; \
             remove it when you no longer need it)",
            aside.display()
        ));
    }
    let at = found.problem(ProblemKind::Index, path.clone(), message);
    found.problems[at].repaired = true;
    let readout = rebuild::read_all(&path, &INDEX_FAMILIES)?;
    if !readout.damage.is_empty() {
        let message = format!(
            "the rebuilt index cannot be read: {}",
            readout.damage.join("; ")
        );
        found.problem(ProblemKind::Index, path, message);
    }
    Ok((readout, state, rebuilt.set_aside))
}

/// Step 3: every entry against its object. Entries that cannot be decoded,
/// name a missing or damaged object, or disagree with their object are to
/// go. Under a shared lock a `link` may have written an object after the
/// listing and its entry since: such an object is checked now. Returns the
/// objects the entries name.
fn cross_check(
    store: &Store,
    entries: &[(Vec<u8>, Option<Entry>)],
    objects: &mut Checks,
    found: &mut Findings,
) -> Named {
    let mut named = Named::new();
    let mut missing: HashMap<ObjectId, u64> = HashMap::new();
    for (key, entry) in entries {
        let Some(entry) = entry else {
            found.stats.malformed_entries += 1;
            let message = format!("the entry {} cannot be decoded", hex(key));
            found.problem(ProblemKind::MalformedEntry, store.index_path(), message);
            found.drop_entry(key);
            continue;
        };
        let Some(checked) = look_up(store, &entry.object, objects, &mut found.stats) else {
            *missing.entry(entry.object).or_default() += 1;
            found.drop_entry(key);
            continue;
        };
        named.entry(entry.object).or_default().push(entry.size);
        if !checked.good() {
            // Reported with the object; its entries go with it.
            found.drop_entry(key);
        } else if checked.size != entry.size || checked.head != entry.header {
            found.stats.mismatched_entries += 1;
            let message = format!(
                "the index entry {} says {} bytes beginning {}, the object has {} bytes \
                 beginning {}",
                hex(key),
                entry.size,
                hex(&entry.header),
                checked.size,
                hex(&checked.head)
            );
            found.problem(
                ProblemKind::MismatchedEntry,
                store.objects.path(&entry.object),
                message,
            );
            found.drop_entry(key);
        }
    }
    report_missing(store, missing, found);
    named
}

/// The object `id` as checked: as listed, or else checked now (and counted).
/// `None` when it does not exist.
fn look_up<'a>(
    store: &Store,
    id: &ObjectId,
    objects: &'a mut Checks,
    stats: &mut VerifyStats,
) -> Option<&'a Checked> {
    match objects.entry(*id) {
        hash_map::Entry::Occupied(listed) => Some(listed.into_mut()),
        hash_map::Entry::Vacant(slot) => {
            let late = check_object(&store.objects, id, &store.objects.path(id))?;
            stats.objects += 1;
            stats.bytes += late.size;
            Some(slot.insert(late))
        }
    }
}

/// Objects entries name that do not exist, in id order, with how many
/// entries name each: their use times are to go too.
fn report_missing(store: &Store, missing: HashMap<ObjectId, u64>, found: &mut Findings) {
    let mut missing: Vec<(ObjectId, u64)> = missing.into_iter().collect();
    missing.sort_by_key(|(id, _)| id.0);
    for (id, count) in missing {
        found.stats.missing_objects += 1;
        found.writes.delete(Family::Used, &id.0);
        let message = format!(
            "{count} index {} this object, which does not exist",
            if count == 1 {
                "entry names"
            } else {
                "entries name"
            }
        );
        found.problem(ProblemKind::MissingObject, store.objects.path(&id), message);
    }
}

/// Step 4: every object, in id order. Damaged, unreadable and stray ones
/// are to be removed with their use times; good ones whose owner or mode
/// changed to be given a fresh inode; orphans are counted, and removed
/// unless they may be what a rebuilt or set-aside index lost.
fn judge_objects(
    store: &Store,
    objects: &Checks,
    named: &Named,
    index: &IndexScan,
    found: &mut Findings,
) {
    // Without an index nothing is known to be an orphan; with one just
    // repaired or rebuilt, or one set aside, orphans may be what it lost:
    // keep them.
    let count_orphans = index.state != IndexState::Damaged;
    let keep_orphans = index.state != IndexState::Ok || !index.set_aside.is_empty();
    let mut ids: Vec<&ObjectId> = objects.keys().collect();
    ids.sort_by_key(|id| id.0);
    for id in ids {
        let checked = &objects[id];
        let path = store.objects.path(id);
        let sizes = named.get(id).map(Vec::as_slice);
        if let Some((kind, message)) = damage(checked, sizes, &mut found.stats) {
            found.writes.delete(Family::Used, &id.0);
            let at = found.problem(kind, path.clone(), message);
            found.remove.push((path, at));
            continue;
        }
        if sizes.is_none() && count_orphans {
            found.stats.orphans += 1;
            if !keep_orphans {
                found.orphans.push(*id);
            }
        }
        if !checked.meta_ok {
            let problem = metadata_problem(store, checked, path, &mut found.stats);
            found.refresh.push((*id, found.problems.len()));
            found.problems.push(problem);
        }
    }
}

/// What is wrong with an object that is not good, counted; `None` for a
/// good one. `sizes` are what its entries say.
fn damage(
    checked: &Checked,
    sizes: Option<&[u64]>,
    stats: &mut VerifyStats,
) -> Option<(ProblemKind, String)> {
    Some(match &checked.state {
        State::Good => return None,
        State::Corrupt => {
            stats.corrupt += 1;
            (ProblemKind::Corrupt, corruption(checked, sizes))
        }
        State::Unloadable(why) => {
            stats.corrupt += 1;
            (
                ProblemKind::Corrupt,
                format!("not a pyc Python can load: {why}"),
            )
        }
        State::NotAFile(what) => {
            stats.strays += 1;
            (ProblemKind::Stray, format!("is {what}, not a pyc file"))
        }
        State::Unreadable(err) => {
            stats.unreadable += 1;
            (ProblemKind::Unreadable, err.to_string())
        }
    })
}

/// How an object whose bytes do not hash to its name differs from what its
/// entries say, and who else holds its damaged bytes.
fn corruption(checked: &Checked, sizes: Option<&[u64]>) -> String {
    let expected = sizes.and_then(|s| s.iter().find(|&&n| n != checked.size));
    let what = match expected {
        Some(n) if *n > checked.size => format!(
            "{} bytes, its index entries say {n}: truncated",
            checked.size
        ),
        Some(n) => format!("{} bytes, its index entries say {n}", checked.size),
        None => format!("{} bytes: changed in place", checked.size),
    };
    let shared = if checked.nlink > 1 {
        let others = checked.nlink - 1;
        format!(
            "; {others} hard {} outside the store {} the damaged bytes",
            if others == 1 { "link" } else { "links" },
            if others == 1 { "shares" } else { "share" },
        )
    } else {
        String::new()
    };
    format!("the content does not match its name ({what}){shared}")
}

/// The strays of the listing, names pycstore never writes in the objects
/// bucket: to be removed.
fn report_strays(strays: &[PathBuf], found: &mut Findings) {
    for stray in strays {
        found.stats.strays += 1;
        let message = "not named like an object: pycstore never writes it there".into();
        let at = found.problem(ProblemKind::Stray, stray.clone(), message);
        found.remove.push((stray.clone(), at));
    }
}

/// Step 6: every recorded pyc against what its object turned out to be, in
/// parallel. Damaged or exposed ones are to be removed from their prefix.
fn check_links(
    store: &Store,
    links: &[(PathBuf, ObjectId)],
    objects: &Checks,
    found: &mut Findings,
) {
    let findings: Vec<(usize, Finding)> = links
        .par_iter()
        .enumerate()
        .filter_map(|(i, (pyc, id))| {
            let object = objects.get(id)?;
            check_link(&store.objects, pyc, id, object).map(|f| (i, f))
        })
        .collect();
    for (i, finding) in findings {
        let pyc = &links[i].0;
        match finding.kind {
            ProblemKind::ExposedLink => found.stats.exposed_links += 1,
            _ => found.stats.damaged_links += 1,
        }
        let at = found.problem(finding.kind, pyc.clone(), finding.message);
        found.unlink.push((pyc.clone(), at, finding.expect));
    }
}

/// Repair, first the index: the entries and use times of what goes, and
/// the records of pycs to be removed, are deleted before any file, as in
/// `gc`. A flush that failed once they were written is handed back, not
/// returned: the deletions wait in the write-ahead log.
fn repair_index(store: &Store, found: &mut Findings) -> Result<Option<crate::Error>> {
    let mut writes = std::mem::take(&mut found.writes);
    for id in &found.orphans {
        writes.delete(Family::Used, &id.0);
    }
    for (pyc, ..) in &found.unlink {
        writes.delete(Family::Links, &crate::index::path_key(pyc));
    }
    // Objects leaving (orphans a prefix may hold, damaged files) start a
    // new entries epoch, as deleted entries do.
    if !found.orphans.is_empty() || !found.remove.is_empty() {
        writes.entries_changed();
    }
    let mut unflushed = None;
    if !writes.is_empty() {
        match store.record(writes) {
            Ok(()) => {}
            Err(e @ crate::Error::IndexFlush { .. }) => unflushed = Some(e),
            Err(e) => return Err(e),
        }
    }
    found.repairs.entries_removed = found.entries_dropped;
    for problem in &mut found.problems {
        if matches!(
            problem.kind,
            ProblemKind::MissingObject | ProblemKind::MismatchedEntry | ProblemKind::MalformedEntry
        ) {
            settle(
                problem,
                Ok(()),
                "removed from the index: the next `pycstore link` compiles again",
            );
        }
    }
    Ok(unflushed)
}

/// Repair, then the files: damaged, unreadable and stray files go, objects
/// whose owner or mode changed get a fresh inode, shard directories go back
/// to the store's owner, damaged or exposed pycs leave their prefix (only
/// the very inode or bytes found, never through a symlink), and orphans go.
fn repair_files(store: &Store, found: &mut Findings) {
    let Findings {
        repairs,
        problems,
        remove,
        refresh,
        shards,
        unlink,
        orphans,
        ..
    } = found;
    for (path, at) in remove.iter() {
        let outcome = remove_object(store.objects.dir(), path);
        repairs.objects_removed += outcome.is_ok() as u64;
        let done = "removed it: the next `pycstore link` compiles it again";
        settle(&mut problems[*at], outcome, done);
    }
    for (id, at) in refresh.iter() {
        let outcome = store.objects.refresh_inode(id);
        if outcome.is_ok() {
            match problems[*at].kind {
                ProblemKind::Owner => repairs.owners_fixed += 1,
                _ => repairs.permissions_fixed += 1,
            }
        }
        let done = "gave it a fresh inode with the store's owner and an object's mode (its bytes \
                    match its name); prefixes holding the old inode are listed apart";
        settle(&mut problems[*at], outcome, done);
    }
    for (path, at) in shards.iter() {
        let outcome = give_back_shard(store.objects.owner(), store.objects.dir(), path);
        repairs.owners_fixed += outcome.is_ok() as u64;
        let done = "gave it back to the store's owner, mode 0700 (2770 in a group store)";
        settle(&mut problems[*at], outcome, done);
    }
    for (pyc, at, expect) in unlink.iter() {
        let outcome = remove_placed(pyc, expect);
        let done = match &outcome {
            Ok(true) => {
                repairs.links_removed += 1;
                "removed it: Python compiles it again, or `pycstore link` its prefix puts a good \
                 pyc back"
            }
            _ => "it was replaced since: left it alone",
        };
        settle(&mut problems[*at], outcome.map(drop), done);
    }
    let removed: Vec<bool> = orphans
        .par_iter()
        .map(|id| remove_object(store.objects.dir(), &store.objects.path(id)).is_ok())
        .collect();
    repairs.orphans_removed = removed.into_iter().filter(|&ok| ok).count() as u64;
}

/// Says what became of a problem: repaired, and what was done; or why not.
fn settle(problem: &mut Problem, outcome: std::io::Result<()>, done: &str) {
    match outcome {
        Ok(()) => {
            problem.repaired = true;
            problem.message.push_str("; ");
            problem.message.push_str(done);
        }
        Err(e) => problem
            .message
            .push_str(&format!("; could not repair it: {e}")),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Every pyc pycstore recorded placing, with the object it placed.
fn recorded_links(readout: &Readout) -> Vec<(PathBuf, ObjectId)> {
    let mut links = Vec::new();
    for (key, value) in readout.family(Family::Links) {
        let Some(id) = value
            .get(..32)
            .and_then(|v| v.try_into().ok())
            .map(ObjectId)
        else {
            continue;
        };
        links.push((PathBuf::from(OsStr::from_bytes(key)), id));
    }
    links
}

/// The problem of a good object whose owner, group or mode is not an
/// object's.
fn metadata_problem(
    store: &Store,
    checked: &Checked,
    path: PathBuf,
    stats: &mut VerifyStats,
) -> Problem {
    let objects = &store.objects;
    let shared = if checked.nlink > 1 {
        format!(
            "; {} hard {} outside the store share this inode",
            checked.nlink - 1,
            if checked.nlink == 2 { "link" } else { "links" }
        )
    } else {
        String::new()
    };
    if !objects.owner().owns(checked.uid, checked.gid) {
        stats.bad_owner += 1;
        Problem {
            kind: ProblemKind::Owner,
            path,
            message: format!(
                "belongs to user id {} and group id {}, not to the store's owner ({}): whoever \
                 owns it can change it, and so every prefix it is hard linked into (a `chown -R` \
                 of one prefix does this){shared}",
                checked.uid,
                checked.gid,
                objects.owner().describe()
            ),
            repaired: false,
        }
    } else {
        stats.bad_permissions += 1;
        Problem {
            kind: ProblemKind::Permissions,
            path,
            message: format!(
                "mode {:04o}: objects are read-only (0444, or {:04o} for a source not everyone \
                 may read); anyone who can write one changes every prefix linked to it{shared}",
                checked.mode,
                objects.private_mode()
            ),
            repaired: false,
        }
    }
}

/// Step 5: the shard directories of the objects bucket. One that belongs
/// to someone else or that others can write is to be given back: whoever
/// can write a shard can swap its objects.
fn check_shards(store: &Store, found: &mut Findings) {
    let owner = store.objects.owner();
    let foreign_write = match owner {
        Owner::User(_) => 0o022,
        Owner::Group(_) => 0o002,
    };
    let Ok(entries) = std::fs::read_dir(store.objects.dir()) else {
        return;
    };
    for entry in entries.flatten() {
        // Symlinks and files there are strays, reported with the listing.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let owned = owner.owns(meta.uid(), meta.gid());
        if owned && meta.mode() & foreign_write == 0 {
            continue;
        }
        found.stats.bad_owner += 1;
        let message = format!(
            "this shard directory belongs to user id {} and group id {}, mode {:04o}; it must \
             belong to the store's owner ({}) and be writable by no one else: whoever can \
             write it can swap the objects inside",
            meta.uid(),
            meta.gid(),
            meta.mode() & 0o7777,
            owner.describe()
        );
        let at = found.problem(ProblemKind::Owner, entry.path(), message);
        found.shards.push((entry.path(), at));
    }
}

/// Gives a shard directory back to the store's owner, mode 0700 (2770),
/// through a descriptor of the shard itself, reached without following a
/// symlink ([`beneath_store`]).
fn give_back_shard(owner: Owner, objects: &Path, path: &Path) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let (parent, name) = beneath_store(objects, path)?;
    let shard = match rustix::fs::openat(
        &parent,
        &name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // No longer a directory: nothing to give back.
        Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP | rustix::io::Errno::NOENT) => {
            return Ok(())
        }
        Err(e) => return Err(with_path(e.into(), "open", path)),
    };
    let (uid, gid) = match owner {
        Owner::User(uid) => (Some(rustix::fs::Uid::from_raw(uid)), None),
        Owner::Group(gid) => (None, Some(rustix::fs::Gid::from_raw(gid))),
    };
    rustix::fs::fchown(&shard, uid, gid)
        .map_err(|e| with_path(e.into(), "change the owner of", path))?;
    rustix::fs::fchmod(&shard, Mode::from_raw_mode(owner.dir_mode()))
        .map_err(|e| with_path(e.into(), "set permissions of", path))
}

/// Something wrong with one recorded pyc.
struct Finding {
    kind: ProblemKind,
    message: String,
    expect: Expect,
}

/// Looks at one pyc pycstore recorded placing from the object `id`, as
/// `object` was found: whether it holds damaged bytes or an inode whose
/// owner or mode changed. Reads it only when it is not the object's inode
/// but shares its inode with other files (an earlier inode of the object:
/// it was rewritten since, or given a fresh one).
fn check_link(objects: &Objects, pyc: &Path, id: &ObjectId, object: &Checked) -> Option<Finding> {
    let (dir, name) = open_parent(pyc).ok()?;
    let st = rustix::fs::statat(&dir, &name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok()?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return None;
    }
    let inode = (st.st_dev, st.st_ino);
    let object_path = objects.path(id);
    let same_inode = inode == (object.dev, object.ino);
    match object.state {
        State::Corrupt if same_inode => Some(Finding {
            kind: ProblemKind::DamagedLink,
            message: format!(
                "shares the inode of the damaged store object `{}`",
                object_path.display()
            ),
            expect: Expect {
                inode: Some(inode),
                bytes: None,
            },
        }),
        State::Corrupt => {
            let found = object.found?;
            if st.st_size as u64 != object.size || hash_at(&dir, &name)? != found {
                return None;
            }
            Some(Finding {
                kind: ProblemKind::DamagedLink,
                message: format!(
                    "holds the damaged bytes of the store object `{}`",
                    object_path.display()
                ),
                expect: Expect {
                    inode: None,
                    bytes: Some((Some(object.size), found)),
                },
            })
        }
        State::Good if same_inode => (!object.meta_ok).then(|| Finding {
            kind: ProblemKind::ExposedLink,
            message: format!(
                "shares the inode of the store object `{}`, owned by user id {} and group id {} \
                 with mode {:04o}: whoever owns it can change this pyc",
                object_path.display(),
                object.uid,
                object.gid,
                object.mode
            ),
            expect: Expect {
                inode: Some(inode),
                bytes: None,
            },
        }),
        State::Good if st.st_nlink > 1 && st.st_dev == object.dev => {
            check_earlier_inode(objects, (&dir, &name), &st, id, object)
        }
        _ => None,
    }
}

/// Looks at a recorded pyc on another inode than its good object's, one
/// it shares with other files: an earlier inode of the object (rewritten
/// since, or given a fresh one). Reads it: it may hold damaged bytes, or
/// good bytes on an inode whose owner or mode changed.
fn check_earlier_inode(
    objects: &Objects,
    (dir, name): (&OwnedFd, &OsStr),
    st: &rustix::fs::Stat,
    id: &ObjectId,
    object: &Checked,
) -> Option<Finding> {
    let (bytes, found) = read_at(dir, name)?;
    let head_len = bytes.len().min(HEADER_LEN);
    // An edited source recompiled by Python has another header; a pyc of
    // the same header and other bytes is a damaged copy.
    let damaged = found != *id
        && (bytes.len() as u64) <= object.size
        && bytes[..head_len] == object.head[..head_len.min(object.head.len())];
    let expect = Expect {
        inode: Some((st.st_dev, st.st_ino)),
        bytes: None,
    };
    let object_path = objects.path(id);
    if damaged {
        Some(Finding {
            kind: ProblemKind::DamagedLink,
            message: format!(
                "is hard linked to an earlier inode of the store object `{}` (it was \
                 rewritten since), and holds damaged bytes ({} bytes, {} expected)",
                object_path.display(),
                bytes.len(),
                object.size
            ),
            expect,
        })
    } else if found == *id && !objects.stat_ok(st) {
        Some(Finding {
            kind: ProblemKind::ExposedLink,
            message: format!(
                "is hard linked to an earlier inode of the store object `{}`, owned by \
                 user id {} and group id {} with mode {:04o}: whoever owns it can change \
                 this pyc in every prefix holding it",
                object_path.display(),
                st.st_uid,
                st.st_gid,
                st.st_mode & 0o7777
            ),
            expect,
        })
    } else {
        None
    }
}

/// Entries derived again from what was linked where: for each pyc recorded
/// as linked from a good object of a hash-based flavor, whose source beside
/// it still has the hash the object's header carries, the entries of that
/// source's compile key. The header proves which source bytes the object was
/// compiled from; a timestamp pyc's does not, so none is derived from one.
fn derive_entries(objects: &Checks, salvaged: &Readout) -> Writes {
    let mut writes = Writes::default();
    for (key, value) in salvaged.family(Family::Links) {
        let Some((id, tag)) = value
            .get(..32)
            .and_then(|v| v.try_into().ok())
            .map(ObjectId)
            .zip(value.get(32))
        else {
            continue;
        };
        // Only what an interpreter of the common key domain compiled: an
        // object from an interpreter others could change (or a record that
        // does not say) must never serve another interpreter.
        if value.get(33) != Some(&1) {
            continue;
        }
        let flavor = match tag {
            1 => Flavor::CheckedHash,
            2 => Flavor::UncheckedHash,
            _ => continue,
        };
        let Some(checked) = objects.get(&id).filter(|c| c.good()) else {
            continue;
        };
        let Ok(head) = <[u8; HEADER_LEN]>::try_from(checked.head.as_slice()) else {
            continue;
        };
        let pyc = Path::new(OsStr::from_bytes(key));
        let Some((source, optimize)) = source_of(pyc) else {
            continue;
        };
        let magic: [u8; 4] = [head[0], head[1], head[2], head[3]];
        if head[4..8] != flavor.flags().to_le_bytes() {
            continue;
        }
        let Some(bytes) = read_regular(&source) else {
            continue;
        };
        let proven = HashVariant::ALL
            .iter()
            .any(|&v| pyc::source_hash(v, magic, &bytes) == head[8..16]);
        if !proven {
            continue;
        }
        let key = CompileKey::new(
            &SourceDigest::of(&bytes),
            magic,
            optimize,
            COMPILE_FLAGS_DEFAULT,
        );
        let entry = Entry {
            object: id,
            size: checked.size,
            header: head,
        };
        for slot in [EntrySlot::Hashed(flavor), EntrySlot::Body] {
            if !salvaged.has_entry(&key, slot) {
                writes.entry(&key, slot, &entry);
            }
        }
    }
    writes
}

/// The bytes of a source in a prefix, if it is a regular file of at most
/// [`MAX_SOURCE_SIZE`](crate::source::MAX_SOURCE_SIZE) bytes (opened with
/// `O_NONBLOCK`: a FIFO planted there cannot hang a repair).
fn read_regular(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let limit = crate::source::MAX_SOURCE_SIZE;
    if !meta.is_file() || meta.len() > limit {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The source and optimize level of `DIR/__pycache__/NAME.TAG[.opt-N].pyc`:
/// `DIR/NAME.py`.
fn source_of(pyc: &Path) -> Option<(PathBuf, u8)> {
    let cache = pyc.parent()?;
    if cache.file_name()? != "__pycache__" {
        return None;
    }
    let name = pyc.file_name()?.to_str()?.strip_suffix(".pyc")?;
    let (rest, optimize) = match name.rsplit_once(".opt-") {
        Some((rest, level)) => (rest, level.parse().ok()?),
        None => (name, 0),
    };
    let (stem, _tag) = rest.rsplit_once('.')?;
    Some((cache.parent()?.join(format!("{stem}.py")), optimize))
}

/// The directory holding `path` (a name in the store's bucket `objects`,
/// or in one of its shards) and `path`'s last component: reached from the
/// store's directory without following any symlink, so that a bucket or a
/// shard swapped for a symlink (in a group store every member can) makes
/// the repair fail rather than act on what it points to.
fn beneath_store(objects: &Path, path: &Path) -> std::io::Result<(OwnedFd, std::ffi::OsString)> {
    use rustix::fs::{Mode, OFlags};
    let outside = || {
        with_path(
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not in the store"),
            "find",
            path,
        )
    };
    let root = objects.parent().ok_or_else(outside)?;
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(outside());
    };
    let relative = parent.strip_prefix(root).map_err(|_| outside())?;
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| with_path(e.into(), "open", root))?;
    let dir = crate::tree::open_dir_beneath(std::os::fd::AsFd::as_fd(&root_fd), relative)
        .at("open", parent)?;
    Ok((dir, name.to_os_string()))
}

/// Sets the mode of the regular file `name` in `dir` (doing nothing to
/// anything else), through the file itself: its `O_PATH` descriptor,
/// opened without following a symlink, is chmod'ed through `/proc`, which
/// leads to that inode only (an object no one may read cannot be opened
/// for `fchmod`).
fn chmod_file_at(dir: &OwnedFd, name: &OsStr, mode: u32) {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::os::fd::AsRawFd;
    let Ok(file) = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    if rustix::fs::fstat(&file)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
    {
        let _ = std::fs::set_permissions(
            format!("/proc/self/fd/{}", file.as_raw_fd()),
            std::fs::Permissions::from_mode(mode),
        );
    }
}

/// Removes a damaged object, or whatever stands in its place, by its name
/// in its directory ([`beneath_store`]): a symlink goes itself, a
/// directory with what is in it (never following a symlink).
fn remove_object(objects: &Path, path: &Path) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType};
    use std::os::fd::AsRawFd;
    let (dir, name) = match beneath_store(objects, path) {
        Ok(found) => found,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let st = match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(with_path(e.into(), "stat", path)),
    };
    match FileType::from_raw_mode(st.st_mode) {
        // Through the descriptor held: no name on the way can be swapped.
        FileType::Directory => {
            let held = Path::new("/proc/self/fd")
                .join(dir.as_raw_fd().to_string())
                .join(&name);
            return std::fs::remove_dir_all(held).at("remove", path);
        }
        // Objects are read-only, and SMB mounts refuse to delete read-only
        // files.
        FileType::RegularFile => chmod_file_at(&dir, &name, 0o644),
        _ => {}
    }
    rustix::fs::unlinkat(&dir, &name, AtFlags::empty())
        .map_err(|e| with_path(e.into(), "remove", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `verify --repair` removes and chmods what is in the store through
    /// descriptors reached from the store without following a symlink: a
    /// bucket or a shard swapped for a symlink to another directory (a
    /// member of a group store can) makes the repair fail, and what the
    /// symlink points to keeps its files and modes.
    #[test]
    fn repairs_never_follow_a_bucket_or_shard_swapped_for_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let (store, elsewhere) = (dir.path().join("store"), dir.path().join("etc"));
        std::fs::create_dir_all(elsewhere.join("ab")).unwrap();
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(elsewhere.join("passwd"), "root:x:0:0\n").unwrap();
        std::fs::write(elsewhere.join("ab/shadow"), "root:*\n").unwrap();
        std::fs::set_permissions(elsewhere.join("ab"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let objects = store.join("objects-v1");
        // The bucket is a symlink.
        std::os::unix::fs::symlink(&elsewhere, &objects).unwrap();
        assert!(remove_object(&objects, &objects.join("passwd")).is_err());
        assert!(remove_object(&objects, &objects.join("ab/shadow")).is_err());
        assert!(give_back_shard(Owner::current_user(), &objects, &objects.join("ab")).is_err());
        // The bucket is real, a shard is a symlink.
        std::fs::remove_file(&objects).unwrap();
        std::fs::create_dir(&objects).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("ab"), objects.join("ab")).unwrap();
        assert!(remove_object(&objects, &objects.join("ab/shadow")).is_err());
        // ... which itself goes, as a stray, not what it points to.
        remove_object(&objects, &objects.join("ab")).unwrap();
        assert!(std::fs::symlink_metadata(objects.join("ab")).is_err());
        assert!(elsewhere.join("passwd").exists() && elsewhere.join("ab/shadow").exists());
        let mode = std::fs::metadata(elsewhere.join("ab"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }
    use crate::index::EntrySlot;
    use crate::key::CompileKey;
    use crate::lock::LockMode;
    use crate::pyc::Flavor;

    fn kinds(report: &VerifyReport) -> Vec<ProblemKind> {
        let mut kinds: Vec<ProblemKind> = report.problems.iter().map(|p| p.kind).collect();
        kinds.sort_by_key(|k| format!("{k:?}"));
        kinds
    }

    /// Stores `n` loadable pycs, each named by one entry.
    fn fill(store: &Store, n: u8) -> Vec<(CompileKey, Entry)> {
        let mut writes = Writes::default();
        let mut stored = Vec::new();
        for i in 0..n {
            let bytes = crate::marshal::test_pyc(&format!("m{i}.py"));
            let entry = Entry {
                object: store.objects.put(&bytes).unwrap(),
                size: bytes.len() as u64,
                header: bytes[..16].try_into().unwrap(),
            };
            let key = CompileKey([i; 32]);
            writes.entry(&key, EntrySlot::Hashed(Flavor::CheckedHash), &entry);
            stored.push((key, entry));
        }
        store.index().unwrap().apply(writes).unwrap();
        stored
    }

    fn make_writable(path: &Path) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    #[test]
    fn every_kind_of_damage_is_found_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(&dir.path().join("store"), LockMode::Exclusive).unwrap();
        let stored = fill(&store, 6);
        let path = |i: usize| store.objects.path(&stored[i].1.object);
        let clean = verify(&store, &VerifyOptions::default()).unwrap();
        assert!(!clean.broken(), "{:?}", clean.problems);
        assert_eq!((clean.stats.objects, clean.stats.entries), (6, 6));

        // 0: a flipped bit; 1: truncated; 2: writable; 3: missing;
        // 4: an entry that disagrees with its good object; 5 stays good.
        make_writable(&path(0));
        let mut flipped = vec![0u8; 40];
        flipped[20] ^= 0x04;
        std::fs::write(path(0), flipped).unwrap();
        make_writable(&path(1));
        std::fs::write(path(1), [1u8; 20]).unwrap();
        make_writable(&path(2));
        std::fs::remove_file(path(3)).unwrap();
        let mut wrong = stored[4].1;
        wrong.header[0] ^= 0xff;
        let mut writes = Writes::default();
        writes.entry(&stored[4].0, EntrySlot::Hashed(Flavor::CheckedHash), &wrong);
        store.index().unwrap().apply(writes).unwrap();
        let orphan = store
            .objects
            .put(&crate::marshal::test_pyc("orphan.py"))
            .unwrap();
        std::fs::write(store.objects.dir().join("stray"), "").unwrap();

        let report = verify(&store, &VerifyOptions::default()).unwrap();
        assert!(report.broken());
        assert_eq!(
            kinds(&report),
            [
                ProblemKind::Corrupt,
                ProblemKind::Corrupt,
                ProblemKind::MismatchedEntry,
                ProblemKind::MissingObject,
                ProblemKind::Permissions,
                ProblemKind::Stray,
            ]
        );
        let truncated = report.problems.iter().find(|p| p.path == path(1)).unwrap();
        assert!(truncated.message.contains("truncated"), "{truncated:?}");
        assert_eq!(report.stats.orphans, 1);
        assert!(report.repairs.is_none());

        let repaired = verify(&store, &VerifyOptions { repair: true }).unwrap();
        assert!(!repaired.broken(), "{:?}", repaired.problems);
        let r = repaired.repairs.clone().unwrap();
        // Entries of 0, 1, 3 and the mismatched 4.
        assert_eq!(r.entries_removed, 4);
        assert_eq!(
            (r.objects_removed, r.orphans_removed, r.permissions_fixed),
            (3, 1, 1)
        );
        assert!(!path(0).exists() && !path(1).exists());
        assert!(!store.objects.path(&orphan).exists());

        let again = verify(&store, &VerifyOptions::default()).unwrap();
        assert!(again.problems.is_empty(), "{:?}", again.problems);
        // 4's object lost its only entry: an orphan now, removed by gc.
        assert_eq!(
            (
                again.stats.objects,
                again.stats.entries,
                again.stats.orphans
            ),
            (3, 2, 1)
        );
    }

    #[test]
    fn a_damaged_index_is_repaired_or_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(&dir.path().join("store"), LockMode::Exclusive).unwrap();
        fill(&store, 3);
        let index = store.index_path();
        for entry in std::fs::read_dir(&index).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "CURRENT" || name.starts_with("MANIFEST-") {
                std::fs::write(entry.path(), "garbage").unwrap();
            }
        }
        let err = store.index().err().expect("a damaged index does not open");
        assert!(err.to_string().contains("verify --repair"), "{err}");

        let report = verify(&store, &VerifyOptions::default()).unwrap();
        assert_eq!(report.index, IndexState::Damaged);
        assert_eq!(kinds(&report), [ProblemKind::Index]);
        assert_eq!((report.stats.objects, report.stats.orphans), (3, 0));

        let report = verify(&store, &VerifyOptions { repair: true }).unwrap();
        assert!(!report.broken(), "{:?}", report.problems);
        assert_eq!(report.index, IndexState::Repaired, "{:?}", report.problems);
        assert!(store.index().is_ok());

        // Beyond RocksDB's repair: set aside, start empty, keep the objects.
        drop(std::fs::remove_dir_all(&index));
        std::fs::write(&index, "not a database").unwrap();
        let report = verify(&store, &VerifyOptions { repair: true }).unwrap();
        assert_eq!(report.index, IndexState::Rebuilt, "{:?}", report.problems);
        let aside = report.index_moved_to.clone().unwrap();
        assert_eq!(std::fs::read(&aside).unwrap(), b"not a database");
        assert_eq!((report.stats.objects, report.stats.orphans), (3, 3));
        assert_eq!(report.repairs.unwrap().orphans_removed, 0);
        let again = verify(&store, &VerifyOptions::default()).unwrap();
        assert!(again.problems.is_empty(), "{:?}", again.problems);
    }
}
