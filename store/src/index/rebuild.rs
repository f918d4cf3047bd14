//! Reading a whole index with its checksums verified, and rebuilding a
//! damaged one without ever losing it.
//!
//! [`read_all`] reads every record of every family in a read-only session
//! with block checksums verified, so a flipped byte in any table shows, and
//! keeps going past the damage of one family to read the others.
//!
//! [`rebuild`] makes a new index from what the damaged one still gives:
//!
//! ```text
//! STORE/
//! ├── index-v2/                    the damaged index: never written to
//! ├── index-v2.work-<random>/      private (0700), reached through its
//! │   │                            descriptor, removed afterwards
//! │   ├── salvage/                 1. a copy (tables hard linked) given to
//! │   │                               RocksDB's repair, which sets aside
//! │   │                               tables it cannot read
//! │   └── new/                     2. a new index: what the damaged one and
//! │                                   the repaired copy give, and what the
//! │                                   caller derives (entries re-derived
//! │                                   from the pycs linked from the store)
//! └── index-v2.broken-<time>/      3. the damaged index, once the new one
//!                                     took its name in one atomic exchange
//! ```
//!
//! Free space for a second copy is checked before anything is written; until
//! the exchange the damaged index is where it was, and any failure removes
//! only the work directories. The damaged index is never deleted: `gc`
//! keeps orphaned objects while any `index-v2.*` directory besides the index
//! exists (or an `index-v1` or `index-v1.*` of an earlier version), since
//! it may name them.
//!
//! [`migrate`] builds the index the same way from one of the earlier layout
//! (`index-v1`, a column family for each family), once.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteBatch, DB};

use super::{
    entry_key, free_bytes, is_no_space, Column, EntrySlot, Family, Index, Writes,
    ENTRIES_EPOCH_KEY, REPAIR_MARGIN,
};
use crate::key::CompileKey;
use crate::layout::{INDEX_DIR, OLD_INDEX_DIR};
use crate::lock::{self, LockMode};
use crate::trust::{self, Bucket, Owner};
use crate::util::{now_secs, with_path, PathContext};
use crate::{Error, Result};

/// What could be read of an index.
#[derive(Debug, Default)]
pub(crate) struct Readout {
    records: BTreeMap<Family, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// What stopped a read: RocksDB's messages, which name the damaged
    /// file. Empty when every record of every family was read.
    pub damage: Vec<String>,
}

impl Readout {
    /// The records of one family (of those asked for), in key order.
    pub fn family(&self, family: Family) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.records
            .get(&family)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Whether an entry of `key` in `slot` was read.
    pub(crate) fn has_entry(&self, key: &CompileKey, slot: EntrySlot) -> bool {
        self.records
            .get(&Family::Entries)
            .is_some_and(|f| f.contains_key(&entry_key(key, slot)))
    }

    /// How many records were read (of the families asked for).
    fn len(&self) -> u64 {
        self.records.values().map(|f| f.len() as u64).sum()
    }
}

/// Reads every record of every family of the index at `path` (of this
/// layout or the earlier one) in a read-only session (sharing the index
/// lock with other readers), with checksums verified. The records of the families in `keep` are returned. Damage is
/// reported in [`Readout::damage`]; only a full disk is an error. A missing
/// index reads as empty.
pub(crate) fn read_all(path: &Path, keep: &[Family]) -> Result<Readout> {
    if !path.exists() {
        return Ok(Readout::default());
    }
    let _lock = lock::lock(&path.with_extension("lock"), LockMode::Shared, "")?;
    read_unlocked(path, keep)
}

fn read_unlocked(path: &Path, keep: &[Family]) -> Result<Readout> {
    let mut out = Readout::default();
    let opts = Options::default();
    let opened = DB::list_cf(&opts, path).and_then(|names| {
        DB::open_cf_for_read_only(&opts, path, &names, false).map(|db| (db, names))
    });
    let (db, names) = match opened {
        Ok(opened) => opened,
        Err(e) if is_no_space(&e) => {
            return Err(Error::IndexNoSpace {
                path: path.to_path_buf(),
                action: "open",
                detail: e.to_string(),
            })
        }
        Err(e) => {
            out.damage.push(e.to_string());
            return Ok(out);
        }
    };
    for name in &names {
        // This layout's column families hold families, each key after its
        // family's byte; in an index of the earlier layout the default one
        // is empty, and each family has a column family of its name.
        let named = Family::from_name(name);
        if named.is_none() && Column::from_name(name).is_none() {
            continue;
        }
        let Some(cf) = db.cf_handle(name) else {
            continue;
        };
        // Read from `from` on; past damage, from the next family on (of a
        // column family holding several), so that, as in the earlier
        // layout, each family gives every record before its first damaged
        // block.
        let mut from: Vec<u8> = Vec::new();
        loop {
            let mut read = ReadOptions::default();
            read.set_verify_checksums(true);
            read.fill_cache(false);
            let mut tag = from.first().copied().unwrap_or(0);
            let mut damaged = false;
            let mode = IteratorMode::From(&from, Direction::Forward);
            for item in db.iterator_cf_opt(cf, read, mode) {
                match item {
                    Ok((k, v)) => {
                        let (family, key) = match named {
                            Some(family) => (family, &k[..]),
                            None => match Family::split(&k) {
                                Some(split) => split,
                                None => continue,
                            },
                        };
                        tag = tag.max(k.first().copied().unwrap_or(0));
                        if keep.contains(&family) {
                            out.records
                                .entry(family)
                                .or_default()
                                .insert(key.to_vec(), v.into_vec());
                        }
                    }
                    Err(e) => {
                        out.damage.push(format!("{e} (column family `{name}`)"));
                        damaged = true;
                        break;
                    }
                }
            }
            match tag.checked_add(1) {
                Some(next) if damaged && named.is_none() && Family::split(&[next]).is_some() => {
                    from = vec![next]
                }
                _ => break,
            }
        }
    }
    Ok(out)
}

/// The outcome of [`rebuild`].
#[derive(Debug)]
pub struct Rebuilt {
    /// Where the damaged index now is (`index-v2.broken-<time>`); `None`
    /// when there was none.
    pub set_aside: Option<PathBuf>,
    /// Records carried over from the damaged index.
    pub kept: u64,
    /// Records the caller derived.
    pub derived: u64,
}

/// Builds a new index from what the one at `path` still gives and from what
/// `derive` adds (given everything read), then puts it in place of the old
/// one, which is set aside. The caller holds the store lock exclusively.
///
/// Fails, with the old index where it was and unchanged, when there is not
/// room for a second copy of it ([`Error::IndexNoSpace`]) or when the new
/// one cannot be written.
pub fn rebuild(path: &Path, derive: impl FnOnce(&Readout) -> Writes) -> Result<Rebuilt> {
    let root = path.parent().unwrap_or(Path::new("."));
    let _lock = lock::lock(&path.with_extension("lock"), LockMode::Exclusive, "")?;
    check_room(path, path, root, "repair", "a repair")?;
    let work = WorkDir::create(root)?;
    let built = match work.build(path, derive, false) {
        Ok(built) => built,
        Err(e) => {
            work.remove();
            return Err(e);
        }
    };
    let set_aside = match swap(path, &work.path().join("new"), root) {
        Ok(set_aside) => set_aside,
        Err(e) => {
            // The damaged index may be in it now: kept, under a name `gc`
            // keeps (and reports).
            work.set_aside();
            return Err(e);
        }
    };
    work.remove();
    Ok(Rebuilt {
        set_aside,
        kept: built.kept,
        derived: built.derived,
    })
}

/// What [`build`] made.
struct Built {
    /// Records carried over.
    kept: u64,
    /// Records the caller derived.
    derived: u64,
    /// The index read had damage (records may be missing).
    damaged: bool,
}

/// Steps 1 and 2: the salvage copy, its repair, and the new index.
/// A new entries epoch is started (entries may be lost: no link record of
/// before vouches for one) unless `whole_keeps_epoch` and everything could
/// be read.
fn build(
    path: &Path,
    salvage: &Path,
    new: &Path,
    derive: impl FnOnce(&Readout) -> Writes,
    whole_keeps_epoch: bool,
) -> Result<Built> {
    let all = Family::ALL;
    // What the damaged index gives as it is: every record before the first
    // damaged block of each family, as current as it gets.
    let live = if path.is_dir() {
        read_unlocked(path, &all)?
    } else {
        Readout {
            damage: vec![format!("`{}` is not a directory", path.display())],
            ..Readout::default()
        }
    };
    // RocksDB's repair of a copy: every table it can read, whole.
    copy_index(path, salvage)?;
    let mut merged = match DB::repair(&Index::options(), salvage) {
        Ok(()) => read_unlocked(salvage, &all)?,
        Err(e) if is_no_space(&e) => return Err(no_space(path, e)),
        Err(e) => {
            tracing::debug!(
                "RocksDB's repair of a copy of `{}` failed: {e}",
                path.display()
            );
            Readout::default()
        }
    };
    if !merged.damage.is_empty() {
        tracing::debug!("the repaired copy still has damage: {:?}", merged.damage);
        merged.damage.clear();
    }
    for (family, records) in live.records {
        merged.records.entry(family).or_default().extend(records);
    }
    merged.damage = live.damage;
    let damaged = !merged.damage.is_empty();
    let kept = merged.len();
    let mut writes = derive(&merged);
    let derived = writes.ops.len() as u64;
    if damaged || !whole_keeps_epoch {
        writes.entries_changed();
    }

    let db = DB::open_cf_descriptors(&Index::options(), new, Index::columns())
        .map_err(|e| write_error(path, new, e))?;
    let column = |family: Family| {
        db.cf_handle(family.column().name())
            .ok_or_else(|| Error::index(new, "a column family is missing"))
    };
    let mut batch = WriteBatch::default();
    let records = merged
        .records
        .iter()
        .flat_map(|(f, r)| r.iter().map(move |(k, v)| (*f, k, Some(v))));
    let derived_ops = writes.ops.iter().map(|(f, k, v)| (*f, k, v.as_ref()));
    for (family, key, value) in records.chain(derived_ops) {
        match value {
            Some(v) => batch.put_cf(column(family)?, family.key(key), v),
            None => batch.delete_cf(column(family)?, family.key(key)),
        }
        if batch.len() >= 10_000 {
            db.write(std::mem::take(&mut batch))
                .map_err(|e| write_error(path, new, e))?;
        }
    }
    if let Some(epoch) = writes.epoch {
        let counters = Family::Counters;
        batch.put_cf(
            column(counters)?,
            counters.key(ENTRIES_EPOCH_KEY),
            epoch.to_le_bytes(),
        );
    }
    db.write(batch).map_err(|e| write_error(path, new, e))?;
    let columns: Vec<_> = Column::ALL
        .iter()
        .filter_map(|c| db.cf_handle(c.name()))
        .collect();
    super::flush(&db, &columns).map_err(|message| {
        if super::filesystem_full(new) {
            Error::IndexNoSpace {
                path: path.to_path_buf(),
                action: "repair",
                detail: message,
            }
        } else {
            Error::index(new, format!("{message}; RocksDB's log in it says why"))
        }
    })?;
    drop(db);
    if path.parent().is_some_and(trust::is_shared) {
        super::share_files(new);
    }
    Ok(Built {
        kept,
        derived,
        damaged,
    })
}

/// Carries an index of the earlier layout (`STORE/index-v1`, a column
/// family for each family) over to this one (`STORE/index-v2`), once, when
/// there is no index of this layout yet. Called as the store is opened,
/// holding the store lock (shared); says whether it carried one over.
///
/// The new index is built as [`rebuild`] builds one, from everything the
/// old one gives, and takes its name when whole. The old index is then
/// removed, or, when reading it met damage, set aside as
/// `index-v1.broken-<time>` (so `gc` keeps the objects it may name); an
/// `index-v1.migrated` marker is left for earlier versions, whose `gc`
/// then keeps the objects their own index does not name. Both index locks
/// are held meanwhile: sessions of this version, and of an earlier one on
/// the old index, wait. Any failure leaves the old index as it was, and
/// the next process tries again.
///
/// Whoever else can write the store root (a group store's members) may
/// swap any name in it for a symlink at any moment: the old index is read
/// through a descriptor opened without following one (and checked as a
/// bucket), and the work is done in a directory of this process's own,
/// private (0700) and named at random, reached through its descriptor
/// too.
pub(crate) fn migrate(root: &Path, owner: Owner) -> Result<bool> {
    let old = root.join(OLD_INDEX_DIR);
    let path = root.join(INDEX_DIR);
    let migrated = || path.join("CURRENT").exists() || old.symlink_metadata().is_err();
    if migrated() {
        return Ok(false);
    }
    let cannot = |e: Error| Error::Index {
        path: old.clone(),
        message: format!(
            "this index, of an earlier version's layout, cannot be carried over to this \
             version's (`{INDEX_DIR}`): {e}; the earlier index is unchanged. A run that can \
             write the store (as its owner) carries it over once"
        ),
    };
    let _lock = lock::lock(
        &path.with_extension("lock"),
        LockMode::Exclusive,
        "another pycstore process to carry the index over to this version's layout",
    )
    .map_err(|e| cannot(e.into()))?;
    if migrated() {
        return Ok(false);
    }
    let _old_lock = lock::lock(
        &old.with_extension("lock"),
        LockMode::Exclusive,
        "an earlier pycstore version's session on the index",
    )
    .map_err(|e| cannot(e.into()))?;
    let Some(old_dir) = trust::open_bucket(root, OLD_INDEX_DIR, Bucket::Dir, owner)? else {
        return Ok(false);
    };
    if !rustix::fs::fstat(&old_dir).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
    }) {
        return Err(cannot(Error::index(&old, "it is not a directory")));
    }
    let old_fd = fd_path(&old_dir);
    check_room(
        &old,
        &old_fd,
        root,
        "carry over",
        "carrying the index over to this version's layout",
    )?;
    let work = WorkDir::create(root).map_err(cannot)?;
    let built = match work.build(&old_fd, |_| Writes::default(), true) {
        Ok(built) => built,
        Err(e) => {
            work.remove();
            return Err(cannot(e));
        }
    };
    if let Err(e) = into_place(&work.fd, root, &path) {
        work.remove();
        return Err(cannot(e));
    }
    // Earlier versions: keep objects their index does not name (their
    // `gc` keeps orphans while any `index-v1.*` exists).
    let marker = root.join(format!("{OLD_INDEX_DIR}.migrated"));
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&marker)
        .and_then(|mut f| f.write_all(MIGRATED_MARKER.as_bytes()));
    // The old index leaves its name in one step, into the work directory
    // (removed with it), or to its set-aside name; it is read no more.
    use rustix::fs::{renameat, CWD};
    if built.damaged {
        let aside = unused_old_name(root, "broken");
        tracing::warn!(
            "the index of an earlier version at `{}` was damaged: what could be read of it is \
             carried over, and it is set aside as `{}`; `pycstore verify` reports it",
            old.display(),
            aside.display()
        );
        if let Err(e) = renameat(CWD, &old, CWD, &aside) {
            tracing::warn!("cannot set aside `{}`: {e}", old.display());
        }
    } else if let Err(e) = renameat(CWD, &old, &work.fd, "old") {
        tracing::warn!("cannot remove `{}`: {e}", old.display());
    }
    work.remove();
    tracing::debug!(
        "carried {} records of `{}` over to `{}`",
        built.kept,
        old.display(),
        path.display()
    );
    Ok(true)
}

/// What the marker `index-v1.migrated` says.
const MIGRATED_MARKER: &str = "This store's index was carried over to index-v2 by a later \
pycstore. While this file exists, an earlier pycstore's gc keeps objects its own index does not \
name.\n";

/// Fails with [`Error::IndexNoSpace`] for `index` (doing `action`) when
/// the filesystem of `root` has no room for a second copy of what is at
/// `measured` plus [`REPAIR_MARGIN`].
fn check_room(
    index: &Path,
    measured: &Path,
    root: &Path,
    action: &'static str,
    what: &str,
) -> Result<()> {
    let needed = tree_size(measured) + REPAIR_MARGIN;
    match free_bytes(root) {
        Some(free) if free < needed => Err(Error::IndexNoSpace {
            path: index.to_path_buf(),
            action,
            detail: format!(
                "{what} needs {} KiB free beside it, {} KiB are; nothing was changed",
                needed / 1024,
                free / 1024
            ),
        }),
        _ => Ok(()),
    }
}

/// The path through which `dir` is reached: its descriptor, never a name
/// someone may swap.
fn fd_path(dir: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

/// The prefix of work directories of [`rebuild`] and [`migrate`].
fn work_prefix() -> String {
    format!("{INDEX_DIR}.work-")
}

/// A work directory of [`rebuild`] and [`migrate`] in the store root: this
/// process's own, private (0700) and named at random, and reached through
/// its descriptor (a group store's members can swap any name in the root).
/// The caller holds the index lock.
struct WorkDir {
    root: PathBuf,
    name: String,
    fd: OwnedFd,
}

impl WorkDir {
    /// Makes one, after sweeping those a process killed mid-way left.
    fn create(root: &Path) -> Result<WorkDir> {
        use rustix::fs::{Mode, OFlags};
        sweep_work_dirs(root);
        let name = format!("{}{:016x}", work_prefix(), fastrand::u64(..));
        let path = root.join(&name);
        rustix::fs::mkdir(&path, Mode::from_raw_mode(0o700)).at("create", &path)?;
        let fd = rustix::fs::open(
            &path,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .at("open", &path)?;
        let stat = rustix::fs::fstat(&fd).at("stat", &path)?;
        if stat.st_uid != trust::euid() || stat.st_mode & 0o077 != 0 {
            return Err(Error::Untrusted {
                path: root.to_path_buf(),
                reason: format!("`{}` was replaced as it was made", path.display()),
            });
        }
        Ok(WorkDir {
            root: root.to_path_buf(),
            name,
            fd,
        })
    }

    /// The path that reaches it through its descriptor.
    fn path(&self) -> PathBuf {
        fd_path(&self.fd)
    }

    /// [`build`] from the index at `from`, into `new` in here (the salvage
    /// copy in `salvage`).
    fn build(
        &self,
        from: &Path,
        derive: impl FnOnce(&Readout) -> Writes,
        whole_keeps_epoch: bool,
    ) -> Result<Built> {
        let path = self.path();
        build(
            from,
            &path.join("salvage"),
            &path.join("new"),
            derive,
            whole_keeps_epoch,
        )
    }

    fn remove(self) {
        let _ = remove_tree(&self.root.join(&self.name));
    }

    /// Keeps it, under a set-aside name (`index-v2.broken-<time>`).
    fn set_aside(self) {
        let _ = std::fs::rename(
            self.root.join(&self.name),
            unused_name(&self.root, "broken"),
        );
    }
}

/// Clears work directories that a process killed mid-way left (the caller
/// holds the index lock: none is in use). One holding an index (`new`) is
/// set aside rather than removed: it may be the damaged index a repair had
/// just exchanged for the new one, which is never deleted.
fn sweep_work_dirs(root: &Path) {
    let prefix = work_prefix();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = entry.path();
        if path.join("new").join("CURRENT").exists() {
            let _ = std::fs::rename(&path, unused_name(root, "broken"));
        } else {
            let _ = remove_tree(&path);
        }
    }
}

/// The new index, `new` in the work directory `work`, takes the name
/// `path`. Something at `path` without an index in it (an empty directory
/// made for a group store, or what a killed run left) is set aside first.
fn into_place(work: &OwnedFd, root: &Path, path: &Path) -> Result<()> {
    use rustix::fs::{renameat, CWD};
    use rustix::io::Errno;
    match renameat(work, "new", CWD, path) {
        Ok(()) => {}
        Err(Errno::NOTEMPTY | Errno::EXIST | Errno::NOTDIR | Errno::ISDIR) => {
            let aside = unused_name(root, "broken");
            std::fs::rename(path, &aside).at("set aside", path)?;
            tracing::warn!(
                "`{}` held no index: it is set aside as `{}`",
                path.display(),
                aside.display()
            );
            renameat(work, "new", CWD, path).at("move into place", path)?;
        }
        Err(e) => return Err(with_path(e.into(), "move into place", path).into()),
    }
    if let Ok(dir) = std::fs::File::open(root) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Step 3: `new` takes the name of `path` in one atomic exchange (two
/// renames where the filesystem cannot exchange), and the old index goes
/// to `index-v2.broken-<time>`.
fn swap(path: &Path, new: &Path, root: &Path) -> Result<Option<PathBuf>> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    let aside = unused_name(root, "broken");
    let exchanged = renameat_with(CWD, new, CWD, path, RenameFlags::EXCHANGE);
    let set_aside = match exchanged {
        Ok(()) => {
            // `new` now holds the old index: give it its set-aside name.
            // Should this fail, the caller sets the work directory aside.
            std::fs::rename(new, &aside).at("set aside the damaged index", new)?;
            Some(aside)
        }
        Err(Errno::NOENT) if !path.exists() => {
            std::fs::rename(new, path).at("move into place", new)?;
            None
        }
        Err(e) => {
            tracing::debug!(
                "cannot exchange `{}` and `{}` atomically ({e}): renaming one after the other",
                new.display(),
                path.display()
            );
            std::fs::rename(path, &aside).at("set aside the damaged index", path)?;
            if let Err(e) = std::fs::rename(new, path) {
                let _ = std::fs::rename(&aside, path);
                return Err(with_path(e, "move into place", new).into());
            }
            Some(aside)
        }
    };
    if let Ok(dir) = std::fs::File::open(root) {
        let _ = dir.sync_all();
    }
    Ok(set_aside)
}

/// Copies the index at `from` into a new directory `to`: tables (which
/// RocksDB never changes) as hard links where it can, the rest as copies;
/// its logs of messages are left out. Nothing of a non-directory.
fn copy_index(from: &Path, to: &Path) -> Result<()> {
    fs_err::create_dir(to)?;
    if !from.is_dir() {
        return Ok(());
    }
    for entry in fs_err::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if !entry.file_type()?.is_file() || name_str.starts_with("LOG") {
            continue;
        }
        let dest = to.join(&name);
        if name_str.ends_with(".sst") && std::fs::hard_link(entry.path(), &dest).is_ok() {
            continue;
        }
        fs_err::copy(entry.path(), &dest)?;
    }
    Ok(())
}

/// Every `index-v2.*` directory or file in the store root besides the index
/// and its lock: indexes that `verify --repair` set aside, and work
/// directories a repair left behind; and the same of the earlier layout
/// (`index-v1.*`), with an earlier index set aside because it was damaged
/// when carried over ([`migrate`]). They may name objects the index does
/// not. (An `index-v1` itself, left or made again by an earlier version
/// once the index was carried over, is a bucket of an older layout, which
/// `gc` removes.)
pub fn set_aside_indexes(root: &Path) -> Vec<PathBuf> {
    let prefixes = [format!("{INDEX_DIR}."), format!("{OLD_INDEX_DIR}.")];
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.ends_with(".lock")
                && !name.starts_with(&work_prefix())
                && name != format!("{OLD_INDEX_DIR}.migrated")
                && prefixes.iter().any(|p| name.starts_with(p))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// `index-v2.<kind>-<unix time>`, unused.
fn unused_name(root: &Path, kind: &str) -> PathBuf {
    unused(root, INDEX_DIR, kind)
}

/// `index-v1.<kind>-<unix time>`, unused.
fn unused_old_name(root: &Path, kind: &str) -> PathBuf {
    unused(root, OLD_INDEX_DIR, kind)
}

fn unused(root: &Path, dir: &str, kind: &str) -> PathBuf {
    let now = now_secs();
    let mut path = root.join(format!("{dir}.{kind}-{now}"));
    let mut n = 1;
    while path.symlink_metadata().is_ok() {
        path = root.join(format!("{dir}.{kind}-{now}-{n}"));
        n += 1;
    }
    path
}

/// Bytes of the files under `path`.
fn tree_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    }
}

fn no_space(path: &Path, err: rocksdb::Error) -> Error {
    Error::IndexNoSpace {
        path: path.to_path_buf(),
        action: "repair",
        detail: format!("{err}; nothing was changed"),
    }
}

fn write_error(path: &Path, new: &Path, err: rocksdb::Error) -> Error {
    if is_no_space(&err) {
        return no_space(path, err);
    }
    Error::index(new, err)
}
