//! Working inside a prefix that someone else may own, through directory
//! descriptors.
//!
//! pycstore often runs as root over trees that other users (or CI jobs) can
//! write while it works. A path checked with `lstat` and then used by name can
//! be swapped for a symlink in between, so nothing under a prefix is written
//! by path: the walk opens each directory relative to its parent with
//! `O_DIRECTORY | O_NOFOLLOW`, and every later `openat`, `mkdirat`, `linkat`,
//! `renameat` and `unlinkat` is relative to such a descriptor, naming one
//! component that is never followed if it is a symlink. A descriptor keeps
//! pointing at the directory it opened whatever happens to the names above
//! it. Temp names are random and created exclusively, so one planted ahead of
//! a run is never followed, only stepped around.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

/// Flags of every directory opened under a prefix.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens a prefix's root directory. The root is the user's own argument, so
/// a symlink there is followed (as `compileall` does); nothing below it is.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(path, flags, Mode::empty())?)
}

/// Opens the directory `name` inside `parent`, refusing a symlink (ELOOP) or
/// anything that is not a directory (ENOTDIR).
pub fn open_dir(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty())?)
}

/// Opens the directory `relative` below `root` without following any symlink
/// and without leaving `root`: `openat2` with `RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS` where the kernel has it, else one `O_NOFOLLOW` open
/// per component. `relative` must be a plain relative path (no `..`).
pub fn open_dir_beneath(root: BorrowedFd<'_>, relative: &Path) -> io::Result<OwnedFd> {
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is not a plain relative path", relative.display()),
        ));
    }
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let target = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    match rustix::fs::openat2(root, target, DIR_FLAGS, Mode::empty(), resolve) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOSYS) => {
            let mut dir = rustix::io::dup(root)?;
            for component in relative.components() {
                if let Component::Normal(name) = component {
                    dir = open_dir(dir.as_fd(), name)?;
                }
            }
            Ok(dir)
        }
        Err(e) => Err(e.into()),
    }
}

/// A fresh temp name for `dir`: `.pycstore-` and 16 random letters, 30 bytes
/// whatever the final name (so a 255-byte pyc name still has a temp name).
pub fn temp_name() -> OsString {
    let mut name = b".pycstore-".to_vec();
    name.extend((0..16).map(|_| fastrand::alphanumeric() as u8));
    name.extend_from_slice(b".tmp");
    OsString::from(OsStr::from_bytes(&name))
}

/// How many fresh temp names are tried before giving up: a name is taken
/// only if someone planted it, which random names make a matter of luck.
const TEMP_ATTEMPTS: u32 = 8;

/// Calls `make` with fresh temp names until one is not taken (EEXIST), and
/// returns the name used with `make`'s result.
pub fn with_temp_name<T>(
    mut make: impl FnMut(&OsStr) -> rustix::io::Result<T>,
) -> io::Result<(OsString, T)> {
    let mut attempt = 0;
    loop {
        let name = temp_name();
        match make(&name) {
            Ok(made) => return Ok((name, made)),
            Err(rustix::io::Errno::EXIST) if attempt + 1 < TEMP_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Creates a new file at a fresh temp name in `dir`, exclusively and without
/// following anything, with `mode`.
pub fn create_temp(dir: BorrowedFd<'_>, mode: u32) -> io::Result<(OsString, OwnedFd)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    with_temp_name(|name| rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(mode)))
}

/// Removes `name` from `dir` (a file, never following it); a name already
/// gone is fine.
pub fn remove(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Raises the soft limit on open files to the hard limit: a walk holds one
/// descriptor per directory with sources until its pycs are placed.
pub fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!("cannot raise the open file limit: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beneath_refuses_symlinks_and_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir(root.join("outside")).unwrap();
        std::os::unix::fs::symlink(root.join("outside"), root.join("a/link")).unwrap();
        let fd = open_root(root).unwrap();
        assert!(open_dir_beneath(fd.as_fd(), Path::new("a/b")).is_ok());
        assert!(open_dir_beneath(fd.as_fd(), Path::new("")).is_ok());
        let err = open_dir_beneath(fd.as_fd(), Path::new("a/link")).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{err}"
        );
        assert!(open_dir_beneath(fd.as_fd(), Path::new("a/../outside")).is_err());
    }

    #[test]
    fn temp_files_never_follow_a_planted_name() {
        let dir = tempfile::tempdir().unwrap();
        let fd = open_root(dir.path()).unwrap();
        let (name, _file) = create_temp(fd.as_fd(), 0o600).unwrap();
        assert_eq!(name.len(), 30);
        assert_ne!(temp_name(), temp_name());
    }
}
