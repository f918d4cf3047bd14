//! Locks that let many processes use one store at once.
//!
//! - `STORE/lock`: every command holds it for its whole run, shared, except
//!   `gc` and `verify --repair`, which hold it exclusive: they may delete
//!   objects, so no one else may be about to link one.
//! - `STORE/index-v2.lock`: exclusive, held only for the short sessions in
//!   which a process reads or writes the RocksDB index (RocksDB itself lets
//!   one process at a time open it). Nobody holds it while compiling, so a
//!   long cold compile never blocks another process's hits.
//!
//! Both are `flock(2)` locks: released by the kernel when a process dies,
//! so a `kill -9` never leaves a stale lock behind. Both are opened without
//! following a symlink, and created mode 0600, or 0660 in a store shared
//! with a group (set explicitly: the creator's umask must not lock the other
//! members out).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::util::{PathContext, PathError};

/// Shared or exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders at once.
    Shared,
    /// One holder, no shared holders.
    Exclusive,
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
    waited: bool,
}

impl LockGuard {
    /// Whether another process held the lock when it was asked for (so
    /// that this one waited for it).
    pub fn waited(&self) -> bool {
        self.waited
    }
}

/// Takes the lock on `path` (creating the file), waiting as long as it
/// takes; says once on stderr what it waits for, naming `what`.
pub fn lock(path: &Path, mode: LockMode, what: &str) -> io::Result<LockGuard> {
    let shared = path.parent().is_some_and(crate::trust::is_shared);
    let file_mode = if shared { 0o660 } else { 0o600 };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(file_mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            let denied = e.kind() == io::ErrorKind::PermissionDenied;
            let err = PathError::new(e, "open the lock file", path);
            if denied && shared {
                err.with_hint(
                    "every member of a group store must be able to write it: its owner can \
                     `chmod g+rw` it",
                )
            } else {
                err
            }
        })?;
    // Created under a umask that took the group's bits, or by an older
    // version: give them back (only its owner can).
    if let Ok(meta) = file.metadata() {
        if meta.uid() == crate::trust::euid() && meta.mode() & 0o777 != file_mode {
            file.set_permissions(std::fs::Permissions::from_mode(file_mode))
                .at("set permissions of", path)?;
        }
    }
    let attempt = match mode {
        LockMode::Shared => file.try_lock_shared(),
        LockMode::Exclusive => file.try_lock(),
    };
    let waited = match attempt {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => {
            if !what.is_empty() {
                eprintln!("pycstore: waiting for {what} (`{}`)", path.display());
            }
            match mode {
                LockMode::Shared => file.lock_shared(),
                LockMode::Exclusive => file.lock(),
            }
            .at("lock", path)?;
            true
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(PathError::new(e, "lock", path).into()),
    };
    Ok(LockGuard {
        _file: file,
        waited,
    })
}
