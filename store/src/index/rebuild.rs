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
//! ├── index-v1/                    the damaged index: never written to
//! ├── index-v1.salvage-<time>/     1. a copy (tables hard linked) given to
//! │                                   RocksDB's repair, which sets aside
//! │                                   tables it cannot read
//! ├── index-v1.new-<time>/         2. a new index: what the damaged one and
//! │                                   the repaired copy give, and what the
//! │                                   caller derives (entries re-derived
//! │                                   from the pycs linked from the store)
//! └── index-v1.broken-<time>/      3. the damaged index, once the new one
//!                                     took its name in one atomic exchange
//! ```
//!
//! Free space for a second copy is checked before anything is written; until
//! the exchange the damaged index is where it was, and any failure removes
//! only the work directories. The damaged index is never deleted: `gc`
//! keeps orphaned objects while any `index-v1.*` directory besides the index
//! exists, since it may name them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, Options, ReadOptions, WriteBatch, DB};

use super::{
    entry_key, free_bytes, is_no_space, EntrySlot, Family, Index, Writes, ENTRIES_EPOCH_KEY,
    REPAIR_MARGIN,
};
use crate::key::CompileKey;
use crate::layout::INDEX_DIR;
use crate::lock::{self, LockMode};
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

/// Reads every record of every family of the index at `path` in a read-only
/// session (sharing the index lock with other readers), with checksums
/// verified. The records of the families in `keep` are returned. Damage is
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
        let family = Family::from_name(name);
        let Some(cf) = db.cf_handle(name) else {
            continue;
        };
        let mut read = ReadOptions::default();
        read.set_verify_checksums(true);
        read.fill_cache(false);
        let records = family
            .filter(|f| keep.contains(f))
            .map(|f| out.records.entry(f).or_default());
        let mut records = records;
        for item in db.iterator_cf_opt(cf, read, IteratorMode::Start) {
            match item {
                Ok((k, v)) => {
                    if let Some(records) = records.as_mut() {
                        records.insert(k.into_vec(), v.into_vec());
                    }
                }
                Err(e) => {
                    out.damage.push(format!("{e} (column family `{name}`)"));
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// The outcome of [`rebuild`].
#[derive(Debug)]
pub struct Rebuilt {
    /// Where the damaged index now is (`index-v1.broken-<time>`); `None`
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
    let needed = tree_size(path) + REPAIR_MARGIN;
    if let Some(free) = free_bytes(root) {
        if free < needed {
            return Err(Error::IndexNoSpace {
                path: path.to_path_buf(),
                action: "repair",
                detail: format!(
                    "a repair needs {} KiB free beside it, {} KiB are; nothing was changed",
                    needed / 1024,
                    free / 1024
                ),
            });
        }
    }
    let salvage = unused_name(root, "salvage");
    let new = unused_name(root, "new");
    let built = build(path, &salvage, &new, derive);
    let _ = remove_tree(&salvage);
    let (kept, derived) = match built {
        Ok(counts) => counts,
        Err(e) => {
            let _ = remove_tree(&new);
            return Err(e);
        }
    };
    let set_aside = swap(path, &new, root)?;
    Ok(Rebuilt {
        set_aside,
        kept,
        derived,
    })
}

/// Steps 1 and 2: the salvage copy, its repair, and the new index.
fn build(
    path: &Path,
    salvage: &Path,
    new: &Path,
    derive: impl FnOnce(&Readout) -> Writes,
) -> Result<(u64, u64)> {
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
    let kept = merged.len();
    let mut writes = derive(&merged);
    let derived = writes.ops.len() as u64;
    // Entries may be lost: no link record of before vouches for one.
    writes.entries_changed();

    let db = DB::open_cf_descriptors(&Index::options(), new, Index::families())
        .map_err(|e| write_error(path, new, e))?;
    let mut batch = WriteBatch::default();
    let records = merged
        .records
        .iter()
        .flat_map(|(f, r)| r.iter().map(move |(k, v)| (*f, k, Some(v))));
    let derived_ops = writes.ops.iter().map(|(f, k, v)| (*f, k, v.as_ref()));
    for (family, key, value) in records.chain(derived_ops) {
        let cf = db
            .cf_handle(family.name())
            .ok_or_else(|| Error::index(new, "a column family is missing"))?;
        match value {
            Some(v) => batch.put_cf(cf, key, v),
            None => batch.delete_cf(cf, key),
        }
        if batch.len() >= 10_000 {
            db.write(std::mem::take(&mut batch))
                .map_err(|e| write_error(path, new, e))?;
        }
    }
    if let Some(epoch) = writes.epoch {
        let cf = db
            .cf_handle(Family::Counters.name())
            .ok_or_else(|| Error::index(new, "a column family is missing"))?;
        batch.put_cf(cf, ENTRIES_EPOCH_KEY, epoch.to_le_bytes());
    }
    db.write(batch).map_err(|e| write_error(path, new, e))?;
    let families: Vec<_> = Family::ALL
        .iter()
        .filter_map(|family| db.cf_handle(family.name()))
        .collect();
    super::flush(&db, &families).map_err(|message| {
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
    if path.parent().is_some_and(crate::trust::is_shared) {
        super::share_files(new);
    }
    Ok((kept, derived))
}

/// Step 3: `new` takes the name of `path` in one atomic exchange (two
/// renames where the filesystem cannot exchange), and the old index goes
/// to `index-v1.broken-<time>`.
fn swap(path: &Path, new: &Path, root: &Path) -> Result<Option<PathBuf>> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    let aside = unused_name(root, "broken");
    let exchanged = renameat_with(CWD, new, CWD, path, RenameFlags::EXCHANGE);
    let set_aside = match exchanged {
        Ok(()) => {
            // `new` now holds the old index: give it its set-aside name.
            // Should this fail, `gc` still keeps it (any `index-v1.*`).
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

/// Every `index-v1.*` directory or file in the store root besides the index
/// and its lock: indexes that `verify --repair` set aside (this version or
/// an older one), and work directories a repair left behind. They may name
/// objects the index does not.
pub fn set_aside_indexes(root: &Path) -> Vec<PathBuf> {
    let prefix = format!("{INDEX_DIR}.");
    let lock = format!("{INDEX_DIR}.lock");
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name != lock && !name.ends_with(".lock")
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// `index-v1.<kind>-<unix time>`, unused.
fn unused_name(root: &Path, kind: &str) -> PathBuf {
    let now = now_secs();
    let mut path = root.join(format!("{INDEX_DIR}.{kind}-{now}"));
    let mut n = 1;
    while path.symlink_metadata().is_ok() {
        path = root.join(format!("{INDEX_DIR}.{kind}-{now}-{n}"));
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
