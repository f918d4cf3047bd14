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
//! `index-v1.broken-<unix time>` (see [`crate::index::rebuild`]). Without
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
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use serde::Serialize;

use crate::index::rebuild::{self, Readout};
use crate::index::{Entry, EntrySlot, Family, Writes};
use crate::key::{CompileKey, SourceDigest, COMPILE_FLAGS_DEFAULT};
use crate::objects::{with_path, ObjectId, Objects};
use crate::pyc::{self, Flavor, HashVariant, HEADER_LEN};
use crate::tree::{hash_at, open_parent, read_at, remove_placed, Expect};
use crate::trust::Owner;
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
    /// Indexes set aside by repairs (`index-v1.*`): while one exists,
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
#[derive(Clone, Debug)]
enum State {
    Good,
    Corrupt,
    /// Hashes to its name but Python cannot load it: why.
    Unloadable(String),
    NotAFile(&'static str),
    Unreadable(String),
}

/// One object as checked.
#[derive(Clone, Debug)]
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
}

/// Reads and hashes the object at `path`; `None` when it does not exist.
fn check_object(objects: &Objects, id: &ObjectId, path: &Path) -> Option<Checked> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(Checked {
                state: State::Unreadable(with_path(e, "stat", path).to_string()),
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
            })
        }
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
    match read {
        Ok(bytes) => {
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
        }
        Err(e) => checked.state = State::Unreadable(with_path(e, "read", path).to_string()),
    }
    Some(checked)
}

/// Runs `verify` (and with `options.repair`, repairs) on a store.
pub fn verify(store: &Store, options: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut stats = VerifyStats::default();
    let mut repairs = Repairs::default();
    let mut problems = Vec::new();

    // 1. Every object, in parallel.
    let listing = store.objects.list()?;
    let mut objects: HashMap<ObjectId, Checked> = listing
        .objects
        .par_iter()
        .filter_map(|id| {
            check_object(&store.objects, id, &store.objects.path(id)).map(|c| (*id, c))
        })
        .collect();
    if options.repair {
        // An object unreadable for its permissions may be good underneath.
        for (id, checked) in objects.iter_mut() {
            if matches!(checked.state, State::Unreadable(_)) {
                let path = store.objects.path(id);
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444));
                if let Some(again) = check_object(&store.objects, id, &path) {
                    if again.good() {
                        stats.unreadable += 1;
                        repairs.permissions_fixed += 1;
                        problems.push(Problem {
                            kind: ProblemKind::Unreadable,
                            path,
                            message: format!(
                                "could not be read (mode {:04o}); made it read-only (0444)",
                                checked.mode
                            ),
                            repaired: true,
                        });
                    }
                    *checked = again;
                }
            }
        }
    }
    stats.objects = objects.len() as u64;
    stats.bytes = objects.values().map(|c| c.size).sum();

    // 2. The index, read whole with its checksums verified: every entry,
    //    and every pyc recorded as placed. A damaged index is rebuilt first
    //    with `repair`.
    let (readout, index_state, index_moved_to) =
        check_index(store, options.repair, &objects, &mut problems)?;
    let set_aside = rebuild::set_aside_indexes(store.root());
    let entries: Vec<(Vec<u8>, Option<Entry>)> = readout
        .family(Family::Entries)
        .map(|(key, value)| (key.to_vec(), Entry::decode(value)))
        .collect();
    let links = recorded_links(&readout);
    drop(readout);
    stats.entries = entries.len() as u64;

    // 3. Cross-check. Under a shared lock a `link` may have written an
    //    object after the listing and its entry since: look again.
    let mut named: HashMap<ObjectId, Vec<u64>> = HashMap::new();
    let mut missing: HashMap<ObjectId, u64> = HashMap::new();
    let mut writes = Writes::default();
    let mut dropped_entries = 0u64;
    for (key, entry) in &entries {
        let Some(entry) = entry else {
            stats.malformed_entries += 1;
            problems.push(Problem {
                kind: ProblemKind::MalformedEntry,
                path: store.index_path(),
                message: format!("the entry {} cannot be decoded", hex(key)),
                repaired: false,
            });
            writes.delete(Family::Entries, key);
            dropped_entries += 1;
            continue;
        };
        let checked = match objects.entry(entry.object) {
            hash_map::Entry::Occupied(found) => found.into_mut(),
            hash_map::Entry::Vacant(slot) => {
                match check_object(
                    &store.objects,
                    &entry.object,
                    &store.objects.path(&entry.object),
                ) {
                    Some(late) => {
                        stats.objects += 1;
                        stats.bytes += late.size;
                        slot.insert(late)
                    }
                    None => {
                        *missing.entry(entry.object).or_default() += 1;
                        writes.delete(Family::Entries, key);
                        dropped_entries += 1;
                        continue;
                    }
                }
            }
        };
        named.entry(entry.object).or_default().push(entry.size);
        if !checked.good() {
            // Reported with the object; its entries go with it.
            writes.delete(Family::Entries, key);
            dropped_entries += 1;
        } else if checked.size != entry.size || checked.head != entry.header {
            stats.mismatched_entries += 1;
            problems.push(Problem {
                kind: ProblemKind::MismatchedEntry,
                path: store.objects.path(&entry.object),
                message: format!(
                    "the index entry {} says {} bytes beginning {}, the object has {} bytes beginning {}",
                    hex(key),
                    entry.size,
                    hex(&entry.header),
                    checked.size,
                    hex(&checked.head)
                ),
                repaired: false,
            });
            writes.delete(Family::Entries, key);
            dropped_entries += 1;
        }
    }
    let mut missing: Vec<(ObjectId, u64)> = missing.into_iter().collect();
    missing.sort_by_key(|(id, _)| id.0);
    for (id, count) in missing {
        stats.missing_objects += 1;
        writes.delete(Family::Used, &id.0);
        problems.push(Problem {
            kind: ProblemKind::MissingObject,
            path: store.objects.path(&id),
            message: format!(
                "{count} index {} this object, which does not exist",
                if count == 1 {
                    "entry names"
                } else {
                    "entries name"
                }
            ),
            repaired: false,
        });
    }

    // 4. Objects: damage, permissions, orphans.
    let mut ids: Vec<ObjectId> = objects.keys().copied().collect();
    ids.sort_by_key(|id| id.0);
    // Without an index nothing is known to be an orphan; with one just
    // repaired or rebuilt, or one set aside, orphans may be what it lost:
    // keep them.
    let count_orphans = index_state != IndexState::Damaged;
    let keep_orphans = index_state != IndexState::Ok || !set_aside.is_empty();
    let mut remove: Vec<(PathBuf, usize)> = Vec::new(); // file, problem index
    let mut orphans = Vec::new();
    let mut refresh: Vec<(ObjectId, usize)> = Vec::new(); // object, problem index
    for id in &ids {
        let checked = &objects[id];
        let path = store.objects.path(id);
        let sizes = named.get(id);
        let message = match &checked.state {
            State::Good => {
                if sizes.is_none() && count_orphans {
                    stats.orphans += 1;
                    if !keep_orphans {
                        orphans.push(*id);
                    }
                }
                if !checked.meta_ok {
                    refresh.push((*id, problems.len()));
                    problems.push(metadata_problem(store, checked, path, &mut stats));
                }
                continue;
            }
            State::Corrupt => {
                stats.corrupt += 1;
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
                (
                    ProblemKind::Corrupt,
                    format!("the content does not match its name ({what}){shared}"),
                )
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
            State::Unreadable(message) => {
                stats.unreadable += 1;
                (ProblemKind::Unreadable, message.clone())
            }
        };
        writes.delete(Family::Used, &id.0);
        remove.push((path.clone(), problems.len()));
        problems.push(Problem {
            kind: message.0,
            path,
            message: message.1,
            repaired: false,
        });
    }
    for stray in &listing.strays {
        stats.strays += 1;
        remove.push((stray.clone(), problems.len()));
        problems.push(Problem {
            kind: ProblemKind::Stray,
            path: stray.clone(),
            message: "not named like an object: pycstore never writes it there".into(),
            repaired: false,
        });
    }
    let shards = check_shards(store, &mut stats, &mut problems);
    // Every recorded pyc, against what its object turned out to be.
    let findings: Vec<(usize, Finding)> = links
        .par_iter()
        .enumerate()
        .filter_map(|(i, (pyc, id))| {
            let object = objects.get(id)?;
            check_link(&store.objects, pyc, id, object).map(|f| (i, f))
        })
        .collect();
    let mut unlink_pycs = Vec::new();
    for (i, finding) in findings {
        let pyc = &links[i].0;
        match finding.kind {
            ProblemKind::ExposedLink => stats.exposed_links += 1,
            _ => stats.damaged_links += 1,
        }
        unlink_pycs.push((pyc.clone(), problems.len(), finding.expect));
        problems.push(Problem {
            kind: finding.kind,
            path: pyc.clone(),
            message: finding.message,
            repaired: false,
        });
    }

    // 5. Repair: entries first, then files.
    if options.repair {
        for id in &orphans {
            writes.delete(Family::Used, &id.0);
        }
        for (pyc, ..) in &unlink_pycs {
            writes.delete(Family::Links, &crate::index::path_key(pyc));
        }
        if !writes.is_empty() {
            store.index()?.apply(writes)?;
        }
        repairs.entries_removed = dropped_entries;
        let say = |p: &mut Problem, outcome: std::io::Result<()>, done: &str| match outcome {
            Ok(()) => {
                p.repaired = true;
                p.message.push_str("; ");
                p.message.push_str(done);
            }
            Err(e) => p.message.push_str(&format!("; could not repair it: {e}")),
        };
        for p in problems.iter_mut() {
            if matches!(
                p.kind,
                ProblemKind::MissingObject
                    | ProblemKind::MismatchedEntry
                    | ProblemKind::MalformedEntry
            ) {
                say(
                    p,
                    Ok(()),
                    "removed from the index: the next `pycstore link` compiles again",
                );
            }
        }
        for (path, at) in &remove {
            let outcome = remove_object(path);
            if outcome.is_ok() {
                repairs.objects_removed += 1;
            }
            say(
                &mut problems[*at],
                outcome,
                "removed it: the next `pycstore link` compiles it again",
            );
        }
        for (id, at) in &refresh {
            let outcome = store.objects.refresh_inode(id);
            if outcome.is_ok() {
                match problems[*at].kind {
                    ProblemKind::Owner => repairs.owners_fixed += 1,
                    _ => repairs.permissions_fixed += 1,
                }
            }
            say(
                &mut problems[*at],
                outcome,
                "gave it a fresh inode with the store's owner and an object's mode (its bytes \
                 match its name); prefixes holding the old inode are listed apart",
            );
        }
        for (path, at) in &shards {
            let outcome = give_back_shard(store.objects.owner(), path);
            if outcome.is_ok() {
                repairs.owners_fixed += 1;
            }
            say(
                &mut problems[*at],
                outcome,
                "gave it back to the store's owner, mode 0700 (2770 in a group store)",
            );
        }
        for (pyc, at, expect) in &unlink_pycs {
            // Only the very inode (or bytes) found; never through a symlink.
            let outcome = remove_placed(pyc, expect);
            let done = match &outcome {
                Ok(true) => {
                    repairs.links_removed += 1;
                    "removed it: Python compiles it again, or `pycstore link` its prefix \
                     puts a good pyc back"
                }
                _ => "it was replaced since: left it alone",
            };
            say(&mut problems[*at], outcome.map(drop), done);
        }
        let removed: Vec<bool> = orphans
            .par_iter()
            .map(|id| remove_object(&store.objects.path(id)).is_ok())
            .collect();
        repairs.orphans_removed = removed.into_iter().filter(|&ok| ok).count() as u64;
    }

    Ok(VerifyReport {
        stats,
        index: index_state,
        index_moved_to,
        set_aside_indexes: set_aside,
        repairs: options.repair.then_some(repairs),
        problems,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
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
        links.push((PathBuf::from(std::ffi::OsStr::from_bytes(key)), id));
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

/// Reports shard directories of the objects bucket that belong to someone
/// else or that others can write: whoever can write a shard can swap its
/// objects. Returns them with the index of their problem.
fn check_shards(
    store: &Store,
    stats: &mut VerifyStats,
    problems: &mut Vec<Problem>,
) -> Vec<(PathBuf, usize)> {
    let owner = store.objects.owner();
    let foreign_write = match owner {
        Owner::User(_) => 0o022,
        Owner::Group(_) => 0o002,
    };
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(store.objects.dir()) else {
        return found;
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
        stats.bad_owner += 1;
        found.push((entry.path(), problems.len()));
        problems.push(Problem {
            kind: ProblemKind::Owner,
            path: entry.path(),
            message: format!(
                "this shard directory belongs to user id {} and group id {}, mode {:04o}; it must \
                 belong to the store's owner ({}) and be writable by no one else: whoever can \
                 write it can swap the objects inside",
                meta.uid(),
                meta.gid(),
                meta.mode() & 0o7777,
                owner.describe()
            ),
            repaired: false,
        });
    }
    found
}

/// Gives a shard directory back to the store's owner, mode 0700 (2770).
fn give_back_shard(owner: Owner, path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| with_path(e, "stat", path))?;
    if !meta.is_dir() {
        return Ok(());
    }
    let (uid, gid) = match owner {
        Owner::User(uid) => (Some(uid), None),
        Owner::Group(gid) => (None, Some(gid)),
    };
    std::os::unix::fs::lchown(path, uid, gid)
        .map_err(|e| with_path(e, "change the owner of", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(owner.dir_mode()))
        .map_err(|e| with_path(e, "set permissions of", path))
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
                    bytes: Some((object.size, found)),
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
            let (bytes, found) = read_at(&dir, &name)?;
            let head_len = bytes.len().min(HEADER_LEN);
            // An edited source recompiled by Python has another header; a
            // pyc of the same header and other bytes is a damaged copy.
            let damaged = found != *id
                && (bytes.len() as u64) <= object.size
                && bytes[..head_len] == object.head[..head_len.min(object.head.len())];
            let expect = Expect {
                inode: Some(inode),
                bytes: None,
            };
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
            } else if found == *id && !objects.stat_ok(&st) {
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
        _ => None,
    }
}

/// Reads the whole index; when it is damaged, reports it, and with
/// `repair` rebuilds it from what can be read, keeping the damaged one.
fn check_index(
    store: &Store,
    repair: bool,
    objects: &HashMap<ObjectId, Checked>,
    problems: &mut Vec<Problem>,
) -> Result<(Readout, IndexState, Option<PathBuf>)> {
    let path = store.index_path();
    let keep = [Family::Entries, Family::Links];
    let readout = rebuild::read_all(&path, &keep)?;
    if readout.damage.is_empty() {
        return Ok((readout, IndexState::Ok, None));
    }
    let cause = readout.damage.join("; ");
    tracing::debug!("the index at `{}` is damaged: {cause}", path.display());
    let mut problem = Problem {
        kind: ProblemKind::Index,
        path: path.clone(),
        message: format!("the index is damaged: {cause}"),
        repaired: false,
    };
    if !repair {
        problem.message.push_str(
            "; run `pycstore verify --repair` to rebuild it from what can be read \
             (objects are kept)",
        );
        problems.push(problem);
        return Ok((readout, IndexState::Damaged, None));
    }
    drop(readout);
    let rebuilt = rebuild::rebuild(&path, |salvaged| derive_entries(objects, salvaged))?;
    let state = if rebuilt.kept + rebuilt.derived > 0 {
        IndexState::Repaired
    } else {
        IndexState::Rebuilt
    };
    problem.repaired = true;
    problem.message.push_str(&format!(
        "; rebuilt it from what could be read: {} {} kept, {} {} derived again from the pycs \
         linked from the store (what was lost, the next `pycstore link` compiles again)",
        rebuilt.kept,
        if rebuilt.kept == 1 {
            "record"
        } else {
            "records"
        },
        rebuilt.derived,
        if rebuilt.derived == 1 {
            "entry"
        } else {
            "entries"
        },
    ));
    if let Some(aside) = &rebuilt.set_aside {
        problem.message.push_str(&format!(
            "; the damaged index is kept at `{}` (orphaned objects are kept while it exists; \
             remove it when you no longer need it)",
            aside.display()
        ));
    }
    problems.push(problem);
    let readout = rebuild::read_all(&path, &keep)?;
    if !readout.damage.is_empty() {
        problems.push(Problem {
            kind: ProblemKind::Index,
            path: path.clone(),
            message: format!(
                "the rebuilt index cannot be read: {}",
                readout.damage.join("; ")
            ),
            repaired: false,
        });
    }
    Ok((readout, state, rebuilt.set_aside))
}

/// Entries derived again from what was linked where: for each pyc recorded
/// as linked from a good object of a hash-based flavor, whose source beside
/// it still has the hash the object's header carries, the entries of that
/// source's compile key. The header proves which source bytes the object was
/// compiled from; a timestamp pyc's does not, so none is derived from one.
fn derive_entries(objects: &HashMap<ObjectId, Checked>, salvaged: &Readout) -> Writes {
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
        let pyc = Path::new(std::ffi::OsStr::from_bytes(key));
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

/// Removes a damaged object, or whatever stands in its place.
fn remove_object(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e, "stat", path)),
    };
    if meta.is_dir() {
        return std::fs::remove_dir_all(path).map_err(|e| with_path(e, "remove", path));
    }
    if meta.is_file() {
        // Objects are read-only, and SMB mounts refuse to delete read-only
        // files.
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644));
    }
    std::fs::remove_file(path).map_err(|e| with_path(e, "remove", path))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
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
