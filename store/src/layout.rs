//! Where the store lives and what lies inside it.
//!
//! ```text
//! $PYCSTORE_DIR (default $XDG_CACHE_HOME/pycstore), mode 0700
//! ├── CACHEDIR.TAG        tells backup tools to skip the store
//! ├── objects-v1/         immutable, read-only pyc files (0444; 0400 or, in a
//! │                       group store, 0440 for sources not all may read)
//! │   └── 3f/             sharded by the first byte of the blake3 of the bytes
//! │       └── 9a0c…e1     the remaining 62 hex digits
//! ├── index-v2/           RocksDB: compile keys → objects, failures, probes,
//! │                       the stat cache, what was linked where, use times
//! ├── index-v2.lock       held during the short sessions on the index
//! ├── lock                shared by every command, exclusive for gc
//! └── tmp/                files being written; renamed into place when whole,
//!                         leftovers older than an hour are swept on open
//! ```
//!
//! Each bucket carries its layout version in its name, so that no version
//! misreads another's. The index of the earlier layout (`index-v1`, a
//! column family for each kind of record) is carried over to `index-v2`
//! once, as the store is opened (`index::rebuild::migrate`).
//!
//! Everything in the store belongs to its owner (in a group store, mode
//! 2770 and 0660, to its group); no bucket is a symlink. Opening refuses
//! a store whose buckets are not so (`trust::check_bucket`); `verify`
//! reports anything else inside that is not.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fs_err as fs;

use crate::index::{Index, Writes};
use crate::lock::{self, LockGuard, LockMode};
use crate::objects::Objects;
use crate::trust::{self, Bucket, Owner};
use crate::util::{with_path, PathContext};
use crate::Result;

/// The bucket holding objects, with its layout version.
pub(crate) const OBJECTS_DIR: &str = "objects-v1";
/// The bucket holding the RocksDB index, with its layout version.
pub(crate) const INDEX_DIR: &str = "index-v2";
/// The index of the earlier layout, carried over to [`INDEX_DIR`] when
/// found (`index::rebuild::migrate`).
pub(crate) const OLD_INDEX_DIR: &str = "index-v1";
/// Scratch space for files being written.
pub(crate) const TMP_DIR: &str = "tmp";
/// The store lock, shared by every command, exclusive for `gc`.
pub(crate) const LOCK_FILE: &str = "lock";
/// The lock of the sessions on the index.
pub(crate) const INDEX_LOCK_FILE: &str = "index-v2.lock";

/// The buckets of the store: what each must be.
const BUCKETS: [(&str, Bucket); 5] = [
    (OBJECTS_DIR, Bucket::Dir),
    (TMP_DIR, Bucket::Dir),
    (INDEX_DIR, Bucket::Dir),
    (LOCK_FILE, Bucket::File),
    (INDEX_LOCK_FILE, Bucket::File),
];

const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by pycstore.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

/// An open store: its objects, and the way to its index.
pub struct Store {
    root: PathBuf,
    /// The immutable pyc files.
    pub objects: Objects,
    /// The store lock, held for the store's lifetime unless it was opened
    /// with [`Store::open_unlocked`].
    _lock: Option<LockGuard>,
}

impl Store {
    /// Opens the store at `root` for use alongside other processes, creating
    /// it private to its owner if missing.
    pub fn open(root: &Path) -> Result<Store> {
        Self::open_with(root, LockMode::Shared)
    }

    /// Opens the store holding its lock in `mode`: exclusive for commands
    /// that delete objects (`gc`, `verify --repair`).
    pub fn open_with(root: &Path, mode: LockMode) -> Result<Store> {
        Self::open_shared(root, mode, None)
    }

    /// Opens the store; when it does not exist yet and `shared_group` is
    /// given, creates it owned by that group (mode 2770) instead of private.
    /// A store owned by someone else is refused unless it was created shared
    /// with a group the caller is in: whoever can write the store can run
    /// code in every environment linked from it.
    pub fn open_shared(root: &Path, mode: LockMode, shared_group: Option<&str>) -> Result<Store> {
        Self::open_inner(root, Some(mode), shared_group)
    }

    /// Opens the store at `root` as [`Store::open_with`] does, but only if
    /// there is one: for commands that only read or clean up a store, which
    /// must not create one (and every missing parent directory) at a
    /// mistyped path. [`Error::NoStore`](crate::Error::NoStore) otherwise.
    pub fn open_existing(root: &Path, mode: LockMode) -> Result<Store> {
        if !is_store(root) {
            return Err(crate::Error::NoStore {
                path: root.to_path_buf(),
            });
        }
        Self::open_inner(root, Some(mode), None)
    }

    /// Opens the store without holding its lock, for a long-running process
    /// (a FUSE mount) that must not block `gc` for its whole life: it takes
    /// the lock with [`Store::lock_shared`] only around writing objects and
    /// recording them, and treats an object it cannot open as a miss.
    pub fn open_unlocked(root: &Path, shared_group: Option<&str>) -> Result<Store> {
        Self::open_inner(root, None, shared_group)
    }

    /// Takes the store lock shared for as long as the guard lives (waiting
    /// for a running `gc`), for a store opened with [`Store::open_unlocked`].
    pub fn lock_shared(&self) -> Result<LockGuard> {
        Ok(lock::lock(
            &self.root.join(LOCK_FILE),
            LockMode::Shared,
            "a running `pycstore gc` to finish",
        )?)
    }

    fn open_inner(
        root: &Path,
        mode: Option<LockMode>,
        shared_group: Option<&str>,
    ) -> Result<Store> {
        if !root.exists() {
            create_root(root, shared_group)?;
        }
        let owner = trust::check(root)?;
        for (name, kind) in BUCKETS {
            trust::check_bucket(root, name, kind, owner)?;
        }
        let mut dirs = vec![OBJECTS_DIR, TMP_DIR];
        if matches!(owner, Owner::Group(_)) {
            // RocksDB would create it under the umask, closed to the group.
            dirs.push(INDEX_DIR);
        }
        for dir in dirs {
            let path = root.join(dir);
            crate::objects::create_dir(&path, owner.dir_mode())?;
            share_dir(&path, owner)?;
        }
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            crate::objects::write_atomic(
                &root.join(TMP_DIR),
                &tag,
                CACHEDIR_TAG.as_bytes(),
                0o644,
            )?;
        }
        let guard = match mode {
            Some(mode) => {
                let what = match mode {
                    LockMode::Shared => "a running `pycstore gc` to finish",
                    LockMode::Exclusive => "other pycstore processes using the store to finish",
                };
                Some(lock::lock(&root.join(LOCK_FILE), mode, what)?)
            }
            None => None,
        };
        // An index of the earlier layout is carried over (holding the
        // store lock: not during an earlier version's `gc`); the buckets
        // are then checked again, and a group's index given its mode.
        let migrated = if root.join(OLD_INDEX_DIR).symlink_metadata().is_ok() {
            let _held = match guard {
                Some(_) => None,
                None => Some(lock::lock(
                    &root.join(LOCK_FILE),
                    LockMode::Shared,
                    "a running `pycstore gc` to finish",
                )?),
            };
            crate::index::rebuild::migrate(root, owner)?
        } else {
            false
        };
        if migrated && matches!(owner, Owner::Group(_)) {
            share_dir(&root.join(INDEX_DIR), owner)?;
        }
        // Checked again once the lock is held, when it had to be waited
        // for: whoever held it (a member of a group store) had all the
        // time they wanted to swap a bucket for a symlink.
        if migrated || guard.as_ref().is_some_and(LockGuard::waited) {
            for (name, kind) in BUCKETS {
                trust::check_bucket(root, name, kind, owner)?;
            }
        }
        sweep_tmp(&root.join(TMP_DIR), owner);
        Ok(Store {
            objects: Objects::with_owner(root.join(OBJECTS_DIR), root.join(TMP_DIR), owner),
            root: root.to_path_buf(),
            _lock: guard,
        })
    }

    /// Opens a session on the index, waiting for other processes' sessions.
    /// Keep it short: one process at a time can have one.
    pub fn index(&self) -> Result<Index> {
        Index::open(&self.index_path())
    }

    /// Writes `writes` in an index session of their own, and ends it: an
    /// error when the writes fail, or the flush that ends the session (a
    /// full filesystem; what was written then waits in the write-ahead log
    /// for the next session).
    pub fn record(&self, writes: Writes) -> Result<()> {
        let mut index = self.index()?;
        index.apply(writes)?;
        index.close()
    }

    /// Opens a read-only session on the index; readers do not wait for
    /// each other.
    pub(crate) fn index_reader(&self) -> Result<Index> {
        Index::open_read_only(&self.index_path())
    }

    /// The index directory.
    pub fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_DIR)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// In a group store, gives a directory of its own that a umask or an
/// older version left closed to the group its mode 2770 back.
fn share_dir(dir: &Path, owner: Owner) -> Result<()> {
    if let Owner::Group(_) = owner {
        let meta = fs::metadata(dir)?;
        if meta.uid() == trust::euid() && meta.mode() & 0o7777 != owner.dir_mode() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(owner.dir_mode()))
                .at("set permissions of", dir)?;
        }
    }
    Ok(())
}

fn create_root(root: &Path, shared_group: Option<&str>) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = root.parent() {
        fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(with_path(e, "create the store directory", root).into()),
    }
    if let Some(group) = shared_group {
        trust::share(root, group)?;
    }
    Ok(())
}

/// Whether `root` holds a store: a directory with the index or the cache
/// directory tag that opening a store writes (a bare or unrelated directory
/// is not one).
pub fn is_store(root: &Path) -> bool {
    root.is_dir()
        && (root.join(INDEX_DIR).exists()
            || root.join(OLD_INDEX_DIR).exists()
            || root.join("CACHEDIR.TAG").exists())
}

/// The default store location: `$XDG_CACHE_HOME/pycstore`, else
/// `~/.cache/pycstore`.
pub fn default_root() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("pycstore"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("pycstore"))
}

/// Removes leftovers of writers that died: anything in `tmp/` untouched for an
/// hour (never through a symlink: [`crate::objects::sweep_temps`]). Younger
/// files may belong to a running process.
fn sweep_tmp(tmp: &Path, owner: Owner) {
    crate::objects::sweep_temps(tmp, std::time::Duration::from_secs(3600), owner, false);
}
