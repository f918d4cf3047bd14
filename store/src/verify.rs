//! `verify`: check every object against its name and the index against the
//! objects, both ways; with `repair`, drop what is broken so the next
//! `link` compiles it again.
//!
//! What is checked:
//!
//! - each object is a regular file, read-only (0444), whose blake3 is its
//!   name: a flipped bit, a truncation or an append changes the hash;
//! - and whose body is one code object Python can load
//!   ([`crate::marshal`]): a valid header and garbage hashes fine;
//! - each index entry names an object that exists, with the entry's size
//!   and header (the first 16 bytes);
//! - objects no entry names are counted (orphans): not an error, a crash
//!   between writing an object and recording it leaves one;
//! - anything else in the objects bucket (strays) is reported;
//! - a damaged object still hard linked into prefixes damages those pycs
//!   too (they share its inode): the ones pycstore recorded are reported.
//!
//! What `repair` does (under the exclusive store lock): a damaged index is
//! first given to RocksDB's repair, and when it still cannot be opened it is
//! moved aside to `index-v1.broken-<unix time>` and replaced by an empty one
//! (objects are kept; the next `link` compiles and records again). Damaged,
//! unreadable and stray files are removed, with every entry that names a
//! removed or missing object and their use times; entries that disagree
//! with their object are removed; permissions of good objects are reset;
//! orphans are removed (unless the index was just repaired: their entries
//! may be what it lost); pycs in prefixes sharing a damaged object's inode
//! are removed, so linking their prefix again puts good ones back. Entries
//! go before the objects, as in `gc`.

use std::collections::{hash_map, HashMap, HashSet};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::Serialize;

use crate::index::{Entry, Family, Index, Writes};
use crate::layout::INDEX_DIR;
use crate::objects::{with_path, ObjectId};
use crate::pyc::HEADER_LEN;
use crate::{Error, Result, Store};

/// The mode of every object.
const OBJECT_MODE: u32 = 0o444;

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
    /// Good objects that are not read-only (mode 0444).
    pub bad_permissions: u64,
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
    /// pycs in prefixes sharing the inode of a damaged object.
    pub damaged_links: u64,
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
    /// Objects made read-only again.
    pub permissions_fixed: u64,
    /// Damaged pycs removed from prefixes.
    pub links_removed: u64,
}

/// The state of the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IndexState {
    /// It opened.
    Ok,
    /// It cannot be opened; `repair` was not asked for.
    Damaged,
    /// RocksDB's repair made it usable; entries it lost are compiled again.
    Repaired,
    /// It could not be repaired: moved aside and replaced by an empty index.
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
    /// A good object that is not read-only.
    Permissions,
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
    /// A pyc in a prefix sharing the inode of a damaged object.
    DamagedLink,
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
fn check_object(id: &ObjectId, path: &Path) -> Option<Checked> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(Checked {
                state: State::Unreadable(with_path(e, "stat", path).to_string()),
                size: 0,
                head: Vec::new(),
                mode: 0,
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
            if ObjectId::of(&bytes) != *id {
                checked.state = State::Corrupt;
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
        .filter_map(|id| check_object(id, &store.objects.path(id)).map(|c| (*id, c)))
        .collect();
    if options.repair {
        // An object unreadable for its permissions may be good underneath.
        for (id, checked) in objects.iter_mut() {
            if matches!(checked.state, State::Unreadable(_)) {
                let path = store.objects.path(id);
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444));
                if let Some(again) = check_object(id, &path) {
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

    // 2. The index: every entry, and the pycs linked from damaged objects
    //    still hard linked somewhere.
    let (index, index_state, index_moved_to) = open_index(store, options.repair, &mut problems)?;
    let mut entries: Vec<(Vec<u8>, Option<Entry>)> = Vec::new();
    let mut links: Vec<(PathBuf, ObjectId)> = Vec::new();
    if let Some(index) = &index {
        entries = index
            .scan(Family::Entries, b"")?
            .into_iter()
            .map(|(key, value)| {
                let entry = Entry::decode(&value);
                (key, entry)
            })
            .collect();
        let shared_damage: HashSet<ObjectId> = objects
            .iter()
            .filter(|(_, c)| !c.good() && c.nlink > 1)
            .map(|(id, _)| *id)
            .collect();
        if !shared_damage.is_empty() {
            for (key, value) in index.scan(Family::Links, b"")? {
                let Some(id) = value
                    .get(..32)
                    .and_then(|v| v.try_into().ok())
                    .map(ObjectId)
                else {
                    continue;
                };
                if shared_damage.contains(&id) {
                    links.push((PathBuf::from(std::ffi::OsStr::from_bytes(&key)), id));
                }
            }
        }
    }
    drop(index);
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
                match check_object(&entry.object, &store.objects.path(&entry.object)) {
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
    // repaired or rebuilt, orphans may be what it lost: keep them.
    let count_orphans = index_state != IndexState::Damaged;
    let keep_orphans = index_state != IndexState::Ok;
    let mut remove: Vec<(PathBuf, usize)> = Vec::new(); // file, problem index
    let mut orphans = Vec::new();
    let mut chmod: Vec<(PathBuf, usize)> = Vec::new();
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
                if checked.mode != OBJECT_MODE {
                    stats.bad_permissions += 1;
                    chmod.push((path.clone(), problems.len()));
                    problems.push(Problem {
                        kind: ProblemKind::Permissions,
                        path,
                        message: format!(
                            "mode {:04o}: objects are read-only (0444), anyone who can write one \
                             changes every prefix linked to it",
                            checked.mode
                        ),
                        repaired: false,
                    });
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
    let mut unlink_pycs = Vec::new();
    for (pyc, id) in &links {
        let object = &objects[id];
        let same_inode = std::fs::symlink_metadata(pyc)
            .is_ok_and(|m| m.dev() == object.dev && m.ino() == object.ino);
        if same_inode {
            stats.damaged_links += 1;
            unlink_pycs.push((pyc.clone(), problems.len(), object.dev, object.ino));
            problems.push(Problem {
                kind: ProblemKind::DamagedLink,
                path: pyc.clone(),
                message: format!(
                    "shares the inode of the damaged store object `{}`",
                    store.objects.path(id).display()
                ),
                repaired: false,
            });
        }
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
        for (path, at) in &chmod {
            let outcome =
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(OBJECT_MODE))
                    .map_err(|e| with_path(e, "set permissions of", path));
            if outcome.is_ok() {
                repairs.permissions_fixed += 1;
            }
            say(&mut problems[*at], outcome, "made it read-only (0444)");
        }
        for (pyc, at, dev, ino) in &unlink_pycs {
            // Only the very inode found damaged; never through a symlink.
            let outcome = match std::fs::symlink_metadata(pyc) {
                Ok(m) if m.dev() == *dev && m.ino() == *ino => {
                    std::fs::remove_file(pyc).map_err(|e| with_path(e, "remove", pyc))
                }
                _ => Ok(()),
            };
            if outcome.is_ok() {
                repairs.links_removed += 1;
            }
            say(
                &mut problems[*at],
                outcome,
                "removed it: `pycstore link` its prefix to put a good pyc back",
            );
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
        repairs: options.repair.then_some(repairs),
        problems,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Opens the index; when it is damaged, reports it, and with `repair`
/// repairs or rebuilds it.
fn open_index(
    store: &Store,
    repair: bool,
    problems: &mut Vec<Problem>,
) -> Result<(Option<Index>, IndexState, Option<PathBuf>)> {
    let (path, message) = match store.index() {
        Ok(index) => return Ok((Some(index), IndexState::Ok, None)),
        Err(Error::Index { path, message }) => (path, message),
        Err(e) => return Err(e),
    };
    tracing::debug!("the index at `{}` does not open: {message}", path.display());
    // The message tells to run repair; say what happened instead.
    let cause = message
        .split("; run `pycstore verify --repair`")
        .next()
        .unwrap_or(&message)
        .to_string();
    let mut problem = Problem {
        kind: ProblemKind::Index,
        path: path.clone(),
        message: format!("the index cannot be opened: {cause}"),
        repaired: false,
    };
    if !repair {
        problem.message.push_str(
            "; run `pycstore verify --repair` to repair or rebuild it (objects are kept)",
        );
        problems.push(problem);
        return Ok((None, IndexState::Damaged, None));
    }
    match Index::repair(&path).and_then(|()| store.index()) {
        Ok(index) => {
            problem.repaired = true;
            problem.message.push_str(
                "; repaired it with RocksDB's repair (what it lost, the next `pycstore link` compiles again)",
            );
            problems.push(problem);
            return Ok((Some(index), IndexState::Repaired, None));
        }
        Err(e) => tracing::debug!("RocksDB's repair of `{}` failed: {e}", path.display()),
    }
    let aside = set_aside_path(store.root());
    std::fs::rename(&path, &aside)
        .map_err(|e| with_path(e, "move aside the damaged index", &path))?;
    let index = store.index()?;
    problem.repaired = true;
    problem.message.push_str(&format!(
        "; it could not be repaired: moved it to `{}` and started an empty index \
         (objects are kept; the next `pycstore link` compiles and records again; \
         `pycstore gc` removes the old one)",
        aside.display()
    ));
    problems.push(problem);
    Ok((Some(index), IndexState::Rebuilt, Some(aside)))
}

/// `index-v1.broken-<unix time>`, unused.
fn set_aside_path(root: &Path) -> PathBuf {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut path = root.join(format!("{INDEX_DIR}.broken-{now}"));
    let mut n = 1;
    while path.exists() {
        path = root.join(format!("{INDEX_DIR}.broken-{now}-{n}"));
        n += 1;
    }
    path
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
