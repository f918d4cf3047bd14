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
use std::io::{self, stderr, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::objects::ObjectId;
use crate::util::with_path;

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
pub(crate) fn open_dir(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty())?)
}

/// Opens the directory `relative` below `root` (with `O_PATH`: for use as
/// a directory descriptor, not for listing) without following any symlink
/// and without leaving `root`: one `openat2` with `RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS` where the kernel has it (Linux 5.6), else one
/// `O_NOFOLLOW` open per component. `relative` must be a plain relative
/// path (no `..`).
pub fn open_dir_beneath(root: BorrowedFd<'_>, relative: &Path) -> io::Result<OwnedFd> {
    open_beneath(root, relative, OFlags::PATH)
}

/// [`open_dir_beneath`] for a descriptor that can also list the directory.
pub(crate) fn open_listable_beneath(root: BorrowedFd<'_>, relative: &Path) -> io::Result<OwnedFd> {
    open_beneath(root, relative, OFlags::RDONLY)
}

fn open_beneath(root: BorrowedFd<'_>, relative: &Path, access: OFlags) -> io::Result<OwnedFd> {
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is not a plain relative path", relative.display()),
        ));
    }
    let flags = access | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let target = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    match rustix::fs::openat2(root, target, flags, Mode::empty(), resolve) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOSYS) => {
            let mut dir = rustix::fs::openat(root, ".", flags, Mode::empty())?;
            for component in relative.components() {
                if let Component::Normal(name) = component {
                    dir = rustix::fs::openat(&dir, name, flags, Mode::empty())?;
                }
            }
            Ok(dir)
        }
        Err(e) => Err(e.into()),
    }
}

/// A fresh temp name for `dir`: `.pycstore-` and 16 random letters, 30 bytes
/// whatever the final name (so a 255-byte pyc name still has a temp name).
pub(crate) fn temp_name() -> OsString {
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
pub(crate) fn with_temp_name<T>(
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
pub(crate) fn create_temp(dir: BorrowedFd<'_>, mode: u32) -> io::Result<(OsString, OwnedFd)> {
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

/// What a recorded file must still be for [`remove_placed`] to remove it.
pub(crate) struct Expect {
    /// This inode (device, inode number).
    pub inode: Option<(u64, u64)>,
    /// Or these bytes (their size when known, and their hash).
    pub bytes: Option<(Option<u64>, ObjectId)>,
}

/// The most a recorded pyc is read for comparing: far above any real pyc.
const PYC_READ_LIMIT: u64 = 256 * 1024 * 1024;

/// Opens the directory of the absolute `path` from `/` without following
/// any symlink ([`open_dir_beneath`]): a symlink anywhere in the path fails.
/// Returns the directory and the file's name in it.
pub(crate) fn open_parent(path: &Path) -> io::Result<(OwnedFd, OsString)> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is not an absolute path of a file", path.display()),
        )
    };
    let name = match path.components().next_back() {
        Some(Component::Normal(name)) => name.to_os_string(),
        _ => return Err(invalid()),
    };
    let parent = path
        .parent()
        .and_then(|p| p.strip_prefix("/").ok())
        .ok_or_else(invalid)?;
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let root = rustix::fs::open("/", flags, Mode::empty())?;
    Ok((open_dir_beneath(root.as_fd(), parent)?, name))
}

/// Reads the regular file `name` in `dir`, not following a symlink and
/// with `O_NONBLOCK` (a FIFO planted there cannot block), at most 256 MiB:
/// its bytes and their hash.
pub(crate) fn read_at(dir: &OwnedFd, name: &OsStr) -> Option<(Vec<u8>, ObjectId)> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
        || st.st_size as u64 > PYC_READ_LIMIT
    {
        return None;
    }
    let mut bytes = Vec::with_capacity(st.st_size as usize);
    std::fs::File::from(fd)
        .take(PYC_READ_LIMIT)
        .read_to_end(&mut bytes)
        .ok()?;
    let id = ObjectId::of(&bytes);
    Some((bytes, id))
}

/// The hash of what [`read_at`] reads.
pub(crate) fn hash_at(dir: &OwnedFd, name: &OsStr) -> Option<ObjectId> {
    read_at(dir, name).map(|(_, id)| id)
}

/// What became of a recorded pyc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placed {
    /// It still was what was placed, `size` bytes: removed (or, in a dry
    /// run, would be).
    Removed(u64),
    /// Something else is there now (Python recompiled it, or a user
    /// replaced it): left alone.
    Changed,
    /// Nothing is there.
    Gone,
}

/// Removes the recorded pyc at `path` if it still is what was placed
/// (`expect`), through directory descriptors that follow no symlink; with
/// `dry_run`, only says whether it would.
pub(crate) fn remove_placed_if(path: &Path, expect: &Expect, dry_run: bool) -> io::Result<Placed> {
    let (dir, name) = match open_parent(path) {
        Ok(found) => found,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Placed::Gone),
        Err(e) => return Err(with_path(e, "open the directory of", path)),
    };
    let st = match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(Placed::Gone),
        Err(e) => return Err(with_path(e.into(), "stat", path)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(Placed::Changed);
    }
    let same_inode = expect.inode == Some((st.st_dev, st.st_ino));
    let same_bytes = !same_inode
        && expect.bytes.is_some_and(|(size, id)| {
            size.is_none_or(|size| st.st_size as u64 == size) && hash_at(&dir, &name) == Some(id)
        });
    if !same_inode && !same_bytes {
        return Ok(Placed::Changed);
    }
    if !dry_run {
        match rustix::fs::unlinkat(&dir, &name, AtFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => return Ok(Placed::Gone),
            Err(e) => return Err(with_path(e.into(), "remove", path)),
        }
    }
    Ok(Placed::Removed(st.st_size as u64))
}

/// [`remove_placed_if`], for real: `Ok(true)` when it was removed.
pub(crate) fn remove_placed(path: &Path, expect: &Expect) -> io::Result<bool> {
    Ok(matches!(
        remove_placed_if(path, expect, false)?,
        Placed::Removed(_)
    ))
}

/// Removes the directory at `path` if it is empty (but for names
/// `ignoring` accepts, for a dry run), walking to it as [`open_parent`]
/// does. `Ok(false)`: not empty, gone, or not a directory.
pub(crate) fn remove_empty_dir(
    path: &Path,
    dry_run: bool,
    ignoring: &dyn Fn(&OsStr) -> bool,
) -> io::Result<bool> {
    let (parent, name) = match open_parent(path) {
        Ok(found) => found,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(with_path(e, "open the directory of", path)),
    };
    let dir = match open_dir(parent.as_fd(), &name) {
        Ok(dir) => dir,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
            ) =>
        {
            return Ok(false)
        }
        Err(e) => return Err(with_path(e, "open", path)),
    };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
    let mut entries = rustix::fs::RawDir::new(&dir, &mut buf);
    while let Some(entry) = entries.next() {
        let entry = entry.map_err(|e| with_path(e.into(), "list", path))?;
        let name = entry.file_name().to_bytes();
        if !matches!(name, b"." | b"..") && !ignoring(OsStr::from_bytes(name)) {
            return Ok(false);
        }
    }
    if dry_run {
        return Ok(true);
    }
    match rustix::fs::unlinkat(&parent, &name, AtFlags::REMOVEDIR) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(with_path(e.into(), "remove", path)),
    }
}

/// The descriptor table [`prepare_descriptors`] makes room for.
const DESCRIPTOR_TABLE: u64 = 8192;

/// Readies the process for the descriptors a link holds (one or two per
/// directory with sources, until its pycs are placed): raises the soft
/// limit on open files to the hard limit, and grows the descriptor table
/// to 8,192 slots (or the limit) at once. Call it first
/// thing in `main`, while the process has one thread: the kernel grows a
/// table shared by several threads only after an RCU grace period, during
/// which every thread opening a descriptor waits (single `close` calls of
/// 15 ms in a warm link of the reference corpus, which took 200 ms on
/// tmpfs before and 158 ms after).
pub fn prepare_descriptors() {
    raise_open_file_limit();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let slots = limit.current.unwrap_or(u64::MAX).min(DESCRIPTOR_TABLE);
    // The lowest free descriptor at or above the table's last slot: one
    // `fcntl` grows the table, the `close` of the copy leaves it grown.
    if let Some(last) = slots.checked_sub(1) {
        let _ = rustix::io::fcntl_dupfd_cloexec(stderr(), last as i32);
    }
}

/// Descriptors open for [`Held`] now.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Descriptors left for everything else (the index's tables, objects being
/// written, interpreters' pipes) when the limit on open files is low.
const UNHELD_RESERVE: u64 = 256;

/// How many descriptors may be [`Held`] at once: the limit on open files
/// (as raised by [`raise_open_file_limit`] before the first walk) less a
/// quarter of it, and at least [`UNHELD_RESERVE`] less.
fn held_max() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let limit = limit.current.unwrap_or(u64::MAX);
        let max = limit.saturating_sub(UNHELD_RESERVE.max(limit / 4));
        usize::try_from(max).unwrap_or(usize::MAX)
    })
}

/// How many descriptors are left outside the [`Held`] budget: the limit on
/// open files less [`held_max`]. Taken once, as [`held_max`] is (taken for
/// each lookup batch, it was 125 more syscalls in a warm link of the
/// reference corpus).
pub(crate) fn unheld() -> usize {
    static UNHELD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *UNHELD.get_or_init(|| {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let limit = usize::try_from(limit.current.unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
        limit.saturating_sub(held_max())
    })
}

/// A directory descriptor kept open across a link's phases (a walked
/// directory with sources, its `__pycache__`), counted against a budget
/// taken from the limit on open files. A tree with more such directories
/// than the budget allows still links: what finds no room is opened again
/// each time it is used ([`DirFd::Own`]), checked to be the directory it
/// was. A hard limit of 1,024 open files would otherwise fail most of a
/// large tree's sources with "Too many open files".
pub(crate) struct Held(OwnedFd);

impl Held {
    /// Opens with `open` when the budget has room, counting the descriptor
    /// held until dropped; `None` (nothing opened) when it has none.
    pub(crate) fn open(open: impl FnOnce() -> io::Result<OwnedFd>) -> Option<io::Result<Held>> {
        if !Held::room() {
            return None;
        }
        Some(open().map(Held).inspect_err(|_| {
            HELD.fetch_sub(1, Ordering::AcqRel);
        }))
    }

    /// `fd`, counted as held, when the budget has room; else `fd` back.
    pub(crate) fn keep(fd: OwnedFd) -> Result<Held, OwnedFd> {
        if Held::room() {
            Ok(Held(fd))
        } else {
            Err(fd)
        }
    }

    /// Takes one place in the budget, if it has one.
    fn room() -> bool {
        let max = held_max();
        HELD.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsFd for Held {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A directory's descriptor for one use: one held for the run (`Held`), or one
/// opened for this use alone (closed when dropped).
pub enum DirFd<'a> {
    /// Held for the run.
    Held(BorrowedFd<'a>),
    /// Opened for this use.
    Own(OwnedFd),
}

impl AsFd for DirFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DirFd::Held(fd) => *fd,
            DirFd::Own(fd) => fd.as_fd(),
        }
    }
}

/// Raises the soft limit on open files to the hard limit: a walk holds one
/// descriptor per directory with sources until its pycs are placed.
pub(crate) fn raise_open_file_limit() {
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
