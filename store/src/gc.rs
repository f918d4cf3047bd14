//! `gc`: keep the store within a size or an age by evicting the least
//! recently used objects, and remove what no run will ever read again.
//!
//! What goes, in this order:
//!
//! 1. always: old layout buckets (`objects-v0/`, `index-v0/`, …); leftovers
//!    in `tmp/`; orphaned objects, which no index entry names, so no `link`
//!    can find them (a crash between writing an object and recording it
//!    leaves one), unless an index set aside by `verify --repair`
//!    (`index-v2.broken-*`, or any other `index-v2.*` or `index-v1.*`)
//!    exists: it may name
//!    them, so they are kept, and the set-aside index is never removed
//!    here (its owner removes it when it is no longer needed);
//! 2. with `--older-than AGE`: objects last used longer ago than `AGE`;
//! 3. with `--max-size SIZE`: least recently used first, until the objects
//!    take at most `SIZE` of disk.
//!
//! Last use is the index's use time of the object (recorded by every `link`
//! that places it), else the file's mtime, or its ctime (when it was
//! written or last linked) for an object still sealed with
//! [`crate::objects::SEAL_MTIME`]. An object still hard linked into
//! a prefix (link count > 1) frees nothing when the store lets go of it, so
//! `--older-than` keeps it and `--max-size` evicts it only when evicting
//! every other object was not enough. Evicting an object removes the index
//! entries that name it (the next `link` of their sources compiles again)
//! and its use time; the record of what was linked where stays, it
//! describes the prefixes. Entries are removed before their objects, so a
//! crash in between leaves orphans for the next `gc`, never an entry naming
//! a missing object.
//!
//! `gc` holds the store lock exclusively: no other process may be about to
//! link an object it deletes.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::index::rebuild::set_aside_indexes;
use crate::index::{Entry, Family, Writes};
use crate::layout::{INDEX_DIR, INDEX_LOCK_FILE, LOCK_FILE, OBJECTS_DIR, TMP_DIR};
use crate::link::Failure;
use crate::objects::ObjectId;
use crate::trust::Owner;
use crate::util::{now_secs, PathError};
use crate::{Result, Store};

/// Files and directories of the store root that belong to the current
/// layout; `gc` leaves them alone.
const KNOWN_ROOT_ENTRIES: &[&str] = &[
    "CACHEDIR.TAG",
    crate::trust::SHARED_MARKER,
    OBJECTS_DIR,
    INDEX_DIR,
    INDEX_LOCK_FILE,
    LOCK_FILE,
    TMP_DIR,
];

/// Leftovers in `tmp/` younger than this may belong to a process that is
/// creating the store (it writes `CACHEDIR.TAG` before taking the lock).
const TMP_GRACE: Duration = Duration::from_secs(60);

/// What `gc` should evict.
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Evict until the objects take at most this many bytes of disk.
    pub max_size: Option<u64>,
    /// Evict objects last used longer ago than this.
    pub older_than: Option<Duration>,
    /// Report what would go; remove nothing.
    pub dry_run: bool,
}

/// Counters of one `gc` run. Sizes on disk are `st_blocks` × 512; sizes of
/// pycs are their lengths.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct GcStats {
    /// Objects in the store before the run.
    pub objects_before: u64,
    /// Disk they took before the run.
    pub bytes_before: u64,
    /// Objects left in the store.
    pub objects_after: u64,
    /// Disk they take.
    pub bytes_after: u64,
    /// Objects evicted, for any reason.
    pub evicted: u64,
    /// Of these, orphans: objects no index entry named.
    pub evicted_orphans: u64,
    /// Of these, objects still linked into prefixes: they freed nothing.
    pub evicted_linked: u64,
    /// Size of the pycs evicted.
    pub freed_logical: u64,
    /// Disk freed by evicting them: the blocks of the ones no prefix links.
    pub freed_physical: u64,
    /// Index entries removed with their objects.
    pub entries_removed: u64,
    /// Old layout buckets removed.
    pub old_layouts_removed: u64,
    /// Disk freed by removing them.
    pub old_layouts_bytes: u64,
    /// Leftover temp files removed.
    pub tmp_removed: u64,
    /// Orphaned objects kept because an index was set aside.
    pub orphans_kept: u64,
}

/// The outcome of `gc`.
#[derive(Debug, Serialize)]
pub struct GcReport {
    /// The counters.
    #[serde(flatten)]
    pub stats: GcStats,
    /// Whether this was a dry run (then the counters say what would go).
    pub dry_run: bool,
    /// The old layout buckets removed.
    pub old_layouts: Vec<PathBuf>,
    /// Indexes set aside by `verify --repair`: while one exists, orphaned
    /// objects are kept (it may name them).
    pub set_aside_indexes: Vec<PathBuf>,
    /// What could not be removed; the next `gc` tries again.
    pub failures: Vec<Failure>,
    /// Wall time in seconds.
    pub elapsed_seconds: f64,
}

/// One object, as `gc` weighs it.
struct Candidate {
    id: ObjectId,
    size: u64,
    disk: u64,
    linked: bool,
    last_use: u64,
    orphan: bool,
}

/// Runs `gc` on a store opened with [`LockMode::Exclusive`](crate::lock::LockMode).
pub fn gc(store: &Store, options: &GcOptions) -> Result<GcReport> {
    let started = Instant::now();
    let mut stats = GcStats::default();
    let mut failures = Vec::new();

    let old_layouts = old_layouts(store.root())?;
    for path in &old_layouts {
        stats.old_layouts_removed += 1;
        stats.old_layouts_bytes += freed_by_tree(path);
        if !options.dry_run {
            if let Err(e) = remove_tree(path) {
                failures.push(e);
            }
        }
    }
    stats.tmp_removed = sweep_tmp(
        &store.root().join(TMP_DIR),
        store.objects.owner(),
        options.dry_run,
        &mut failures,
    );

    // The objects: size, disk, links, mtime. Under the exclusive lock
    // nothing appears or vanishes meanwhile.
    let listing = store.objects.list()?;
    let mut candidates: Vec<Candidate> = listing
        .objects
        .par_iter()
        .filter_map(|id| {
            let path = store.objects.path(id);
            let meta = std::fs::symlink_metadata(&path).ok()?;
            if !meta.is_file() {
                // Not something `link` wrote: `verify` reports it.
                return None;
            }
            Some(Candidate {
                id: *id,
                size: meta.len(),
                disk: disk_usage(&meta),
                linked: meta.nlink() > 1,
                last_use: crate::objects::last_written(&meta).max(0) as u64,
                orphan: true,
            })
        })
        .collect();
    stats.objects_before = candidates.len() as u64;
    stats.bytes_before = candidates.iter().map(|c| c.disk).sum();

    // One index session: read which entries name each object and when each
    // was last used, decide, and remove the entries of what goes.
    let mut index = store.index()?;
    let mut entries: HashMap<ObjectId, Vec<Vec<u8>>> = HashMap::new();
    for (key, value) in index.scan(Family::Entries, b"")? {
        if let Some(entry) = Entry::decode(&value) {
            entries.entry(entry.object).or_default().push(key);
        }
    }
    let used: HashMap<ObjectId, u64> = index
        .scan(Family::Used, b"")?
        .into_iter()
        .filter_map(|(key, value)| {
            let id = ObjectId(key.as_slice().try_into().ok()?);
            let when = u64::from_le_bytes(value.as_slice().try_into().ok()?);
            Some((id, when))
        })
        .collect();
    // An index set aside by a repair may name what this one lost: nothing
    // is an orphan while one exists.
    let set_aside = set_aside_indexes(store.root());
    for c in &mut candidates {
        c.orphan = !entries.contains_key(&c.id);
        if c.orphan && !set_aside.is_empty() {
            c.orphan = false;
            stats.orphans_kept += 1;
        }
        if let Some(&when) = used.get(&c.id) {
            c.last_use = when;
        }
    }

    let evict = choose(&candidates, options, now_secs());

    let mut writes = Writes::default();
    for &i in &evict {
        let c = &candidates[i];
        for key in entries.get(&c.id).into_iter().flatten() {
            writes.delete(Family::Entries, key);
            stats.entries_removed += u64::from(crate::index::counts_as_entry(key));
        }
        if used.contains_key(&c.id) {
            writes.delete(Family::Used, &c.id.0);
        }
        stats.evicted += 1;
        stats.evicted_orphans += c.orphan as u64;
        stats.evicted_linked += c.linked as u64;
        stats.freed_logical += c.size;
        if !c.linked {
            stats.freed_physical += c.disk;
        }
    }
    // A linked object leaving (an orphan too: a prefix may hold it) starts
    // a new entries epoch, so links look its pycs' entries up again.
    if evict.iter().any(|&i| candidates[i].linked) {
        writes.entries_changed();
    }
    if !options.dry_run {
        index.apply(writes)?;
    }
    // A session fails to close only when its flush fails: the entries'
    // deletions are then in the write-ahead log, taken up by the next
    // session, so the objects still go (a full disk is when a gc is run
    // to free space), and the error is returned after.
    let closed = index.close();

    if !options.dry_run {
        let removed: Vec<std::result::Result<(), PathError>> = evict
            .par_iter()
            .map(|&i| {
                let path = store.objects.path(&candidates[i].id);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(PathError::new(e, "remove", &path)),
                }
            })
            .collect();
        failures.extend(removed.into_iter().filter_map(|r| r.err()));
    }
    closed?;

    stats.objects_after = stats.objects_before - stats.evicted;
    stats.bytes_after = stats.bytes_before - evict.iter().map(|&i| candidates[i].disk).sum::<u64>();
    Ok(GcReport {
        stats,
        dry_run: options.dry_run,
        old_layouts,
        set_aside_indexes: set_aside,
        failures: failures.into_iter().map(failure).collect(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The indices of the candidates to evict, in eviction order: orphans, then
/// unlinked objects unused since before `--older-than`, then by size: least
/// recently used first, objects linked into prefixes last.
fn choose(candidates: &[Candidate], options: &GcOptions, now: u64) -> Vec<usize> {
    let mut chosen = vec![false; candidates.len()];
    let mut order = Vec::new();
    let mut by_age: Vec<usize> = (0..candidates.len()).collect();
    by_age.sort_by_key(|&i| {
        let c = &candidates[i];
        (c.linked, c.last_use, c.id.0)
    });
    for &i in &by_age {
        if candidates[i].orphan {
            chosen[i] = true;
            order.push(i);
        }
    }
    if let Some(age) = options.older_than {
        let cutoff = now.saturating_sub(age.as_secs());
        for &i in &by_age {
            let c = &candidates[i];
            if !chosen[i] && !c.linked && c.last_use < cutoff {
                chosen[i] = true;
                order.push(i);
            }
        }
    }
    if let Some(max) = options.max_size {
        let mut total: u64 = (0..candidates.len())
            .filter(|&i| !chosen[i])
            .map(|i| candidates[i].disk)
            .sum();
        for &i in &by_age {
            if total <= max {
                break;
            }
            if !chosen[i] {
                chosen[i] = true;
                order.push(i);
                total -= candidates[i].disk;
            }
        }
    }
    order
}

/// Entries of the store root left by older layout versions: `objects-vN`
/// and `index-vN` (with its `.lock`) older than the current ones. Indexes
/// `verify --repair` moved aside are kept, and so are buckets of a later
/// version (one may be using the store too). Anything else unknown is left
/// alone: it is not pycstore's.
fn old_layouts(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = fs_err::read_dir(root)?;
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if KNOWN_ROOT_ENTRIES.contains(&name.as_str()) {
            continue;
        }
        let older = |current: &str| {
            let at = current.rfind('v').expect("a versioned bucket") + 1;
            let (bucket, version) = current.split_at(at);
            let version: u32 = version.parse().expect("a versioned bucket");
            name.strip_prefix(bucket)
                .map(|rest| rest.strip_suffix(".lock").unwrap_or(rest))
                .filter(|v| !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|v| v < version)
        };
        if older(OBJECTS_DIR) || older(INDEX_DIR) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// Removes temp files no process is writing: under the exclusive lock, all
/// but the youngest (see [`TMP_GRACE`]). Returns how many went.
fn sweep_tmp(tmp: &Path, owner: Owner, dry_run: bool, failures: &mut Vec<PathError>) -> u64 {
    let (removed, failed) = crate::objects::sweep_temps(tmp, TMP_GRACE, owner, dry_run);
    failures.extend(failed);
    removed
}

/// Removes a file or a directory tree; directories made read-only (old
/// object shards may be) are made writable first.
fn remove_tree(path: &Path) -> std::result::Result<(), PathError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| PathError::new(e, "stat", path))?;
    if !meta.is_dir() {
        return std::fs::remove_file(path).map_err(|e| PathError::new(e, "remove", path));
    }
    if std::fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(path).into_iter().flatten() {
        if entry.file_type().is_dir() {
            // Through a descriptor of the directory itself: a name swapped
            // for a symlink since the walk saw it is not followed.
            use rustix::fs::{Mode, OFlags};
            if let Ok(dir) = rustix::fs::open(
                entry.path(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                let _ = rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700));
            }
        }
    }
    std::fs::remove_dir_all(path).map_err(|e| PathError::new(e, "remove", path))
}

/// Disk a tree frees when removed: the blocks of its files that have no
/// other link.
fn freed_by_tree(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_dir() || m.nlink() == 1)
        .map(|m| disk_usage(&m))
        .sum()
}

fn disk_usage(meta: &std::fs::Metadata) -> u64 {
    meta.blocks() * 512
}

/// A failure as the report lists it.
fn failure(err: PathError) -> Failure {
    Failure {
        path: err.path.clone(),
        message: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::EntrySlot;

    #[test]
    fn opening_the_store_leaves_another_process_s_temp_objects_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let writer = Store::open_with(&root, crate::lock::LockMode::Shared).unwrap();
        let temp = writer
            .objects
            .write_temp(b"an object on its way in")
            .unwrap();
        // Another process opens the store (and sweeps its leftovers).
        let _other = Store::open_with(&root, crate::lock::LockMode::Shared).unwrap();
        assert!(
            temp.exists(),
            "a sealed temp object was swept while being written"
        );
    }

    /// What is planted in `tmp/` (group members can) is swept, never
    /// followed: an old symlink to a file elsewhere goes itself, and the
    /// file keeps its mode and its bytes, whoever opens the store.
    #[test]
    fn opening_the_store_sweeps_a_planted_symlink_not_its_target() {
        use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        drop(Store::open_with(&root, crate::lock::LockMode::Shared).unwrap());
        let outside = dir.path().join("passwd");
        std::fs::write(&outside, "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tmp = root.join(TMP_DIR);
        let (link, old) = (tmp.join("planted"), tmp.join("left-by-a-dead-writer"));
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        std::fs::write(&old, "").unwrap();
        let day_ago = Timespec {
            tv_sec: now_secs() as i64 - 86_400,
            tv_nsec: 0,
        };
        let times = Timestamps {
            last_access: day_ago,
            last_modification: day_ago,
        };
        for path in [&link, &old] {
            rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        }
        drop(Store::open_with(&root, crate::lock::LockMode::Shared).unwrap());
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "the symlink stayed"
        );
        assert!(!old.exists(), "the old temp file stayed");
        let meta = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o644,
            "its target was chmod'ed"
        );
        assert!(std::fs::read(&outside).unwrap().starts_with(b"root:"));
    }

    #[test]
    fn a_sealed_temp_file_being_written_is_not_swept() {
        let (dir, objects) = crate::objects::Objects::scratch();
        let tmp = dir.path().join("tmp");
        let temp = objects.write_temp(b"an object on its way in").unwrap();
        let mtime = std::fs::metadata(&temp).unwrap().mtime();
        assert!(mtime < 60, "sealed: {mtime}");
        let mut failures = Vec::new();
        assert_eq!(sweep_tmp(&tmp, objects.owner(), false, &mut failures), 0);
        assert!(temp.exists());
    }
    use crate::key::CompileKey;
    use crate::pyc::Flavor;

    fn candidate(n: u8, last_use: u64, linked: bool, orphan: bool) -> Candidate {
        Candidate {
            id: ObjectId([n; 32]),
            size: 1000,
            disk: 4096,
            linked,
            last_use,
            orphan,
        }
    }

    #[test]
    fn orphans_first_then_least_recently_used_then_linked() {
        let c = [
            candidate(0, 100, true, false),  // oldest, but linked
            candidate(1, 300, false, false), // newest unlinked
            candidate(2, 200, false, false), // oldest unlinked
            candidate(3, 900, false, true),  // orphan
            candidate(4, 250, true, false),  // linked, newer
        ];
        let now = 1000;
        // No limit: orphans only.
        assert_eq!(choose(&c, &GcOptions::default(), now), [3]);
        // Room for three: the orphan and the least recently used unlinked one.
        let fit = |objects: u64| GcOptions {
            max_size: Some(objects * 4096),
            ..GcOptions::default()
        };
        assert_eq!(choose(&c, &fit(3), now), [3, 2]);
        // Room for one: every unlinked object, then the older linked one.
        assert_eq!(choose(&c, &fit(1), now), [3, 2, 1, 0]);
        assert_eq!(choose(&c, &fit(0), now), [3, 2, 1, 0, 4]);
        // By age: linked objects are kept, however old.
        let old = GcOptions {
            older_than: Some(Duration::from_secs(750)),
            ..GcOptions::default()
        };
        assert_eq!(choose(&c, &old, now), [3, 2]);
    }

    #[test]
    fn evicts_entries_with_their_objects_and_old_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open_with(&root, crate::lock::LockMode::Exclusive).unwrap();
        let mut writes = Writes::default();
        let mut ids = Vec::new();
        for n in 0..4u8 {
            let bytes = vec![n; 100];
            let id = store.objects.put(&bytes).unwrap();
            let entry = Entry {
                object: id,
                size: 100,
                header: [n; 16],
            };
            let key = CompileKey([n; 32]);
            writes.entry(&key, EntrySlot::Hashed(Flavor::CheckedHash), &entry);
            writes.entry(&key, EntrySlot::Body, &entry);
            // Object 0 has no use time: its ctime (now) makes it the newest.
            if n > 0 {
                writes.used(&id, 1000 + n as u64);
            }
            ids.push(id);
        }
        store.index().unwrap().apply(writes).unwrap();
        let orphan = store.objects.put(b"no entry names me").unwrap();
        std::fs::create_dir_all(root.join("objects-v0/ab")).unwrap();
        std::fs::write(root.join("objects-v0/ab/cd"), "old").unwrap();
        std::fs::create_dir(root.join("index-v0")).unwrap();
        std::fs::write(root.join("index-v1.lock"), "").unwrap();
        // A later version's buckets, and an earlier version's marker.
        std::fs::create_dir(root.join("index-v3")).unwrap();
        std::fs::create_dir(root.join("objects-v2")).unwrap();
        std::fs::write(root.join("index-v1.migrated"), "").unwrap();
        std::fs::write(root.join("notes"), "not pycstore's").unwrap();

        let disk: u64 = ids
            .iter()
            .map(|id| disk_usage(&std::fs::metadata(store.objects.path(id)).unwrap()))
            .sum();
        let options = GcOptions {
            max_size: Some(disk - 1),
            ..GcOptions::default()
        };
        let dry = gc(
            &store,
            &GcOptions {
                dry_run: true,
                ..options.clone()
            },
        )
        .unwrap();
        assert_eq!((dry.stats.evicted, dry.stats.old_layouts_removed), (2, 3));
        assert!(store.objects.path(&orphan).exists());
        assert!(root.join("objects-v0").exists());

        let report = gc(&store, &options).unwrap();
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let s = &report.stats;
        assert_eq!((s.objects_before, s.evicted, s.evicted_orphans), (5, 2, 1));
        // Object 1's checked-hash entry; its body record goes uncounted.
        assert_eq!((s.entries_removed, s.freed_logical), (1, 100 + 17));
        assert_eq!(s.objects_after, 3);
        assert!(!store.objects.path(&orphan).exists());
        assert!(!store.objects.path(&ids[1]).exists(), "least recently used");
        for id in [ids[0], ids[2], ids[3]] {
            assert!(store.objects.path(&id).exists());
        }
        let index = store.index().unwrap();
        let key = CompileKey([1; 32]);
        assert_eq!(index.entry(&key, EntrySlot::Body).unwrap(), None);
        assert_eq!(index.get(Family::Used, &ids[1].0).unwrap(), None);
        assert!(index
            .entry(&CompileKey([2; 32]), EntrySlot::Body)
            .unwrap()
            .is_some());
        drop(index);
        assert_eq!(
            report.old_layouts,
            [
                root.join("index-v0"),
                root.join("index-v1.lock"),
                root.join("objects-v0")
            ]
        );
        assert!(!root.join("objects-v0").exists() && !root.join("index-v0").exists());
        for kept in ["notes", "index-v3", "objects-v2", "index-v1.migrated"] {
            assert!(root.join(kept).exists(), "{kept}");
        }
    }
}
