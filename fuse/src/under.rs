//! The tree beneath a view, reached through a directory descriptor opened
//! before mounting: when the mount covers the prefix itself (`--over`), its
//! path leads back into the mount, and only the descriptor still reaches the
//! files underneath. Every operation is relative to it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, StatxFlags};

/// A directory tree reached through a descriptor.
pub(crate) struct Under {
    base: OwnedFd,
    root: PathBuf,
    /// `root` with every symlink resolved, as the kernel names the base.
    real_root: PathBuf,
    /// Whether a symlink to a directory on the way to a node is followed
    /// ([`Under::at`]).
    follow_dirs: bool,
    /// Which filesystems a walk may enter ([`Under::may_enter`]).
    mounts: std::sync::Mutex<Mounts>,
    /// The device and inode of the mount over `root` (`--over`), once
    /// looked up: a walk that lands there means the base.
    covering: Option<std::sync::OnceLock<Option<(u64, u64)>>>,
}

/// What `/proc/self/mountinfo` said of each filesystem with an anonymous
/// device (FUSE, tmpfs, btrfs, overlay...), read again once it is a second
/// old or names no such device: an anonymous device number is reused once
/// its filesystem is gone.
#[derive(Default)]
struct Mounts {
    read_at: Option<std::time::Instant>,
    /// Device: whether a walk may enter it.
    verdicts: std::collections::HashMap<u64, bool>,
}

/// `stat` of a file of the tree, in the form the views need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Meta {
    fn from_stat(st: &Stat) -> Meta {
        let ns = |s: i64, n: u64| s * 1_000_000_000 + n as i64;
        Meta {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime_ns: ns(st.st_atime, st.st_atime_nsec),
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// The file type bits.
    pub fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type() == FileType::Directory
    }

    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.file_type() == FileType::RegularFile
    }

    /// `st_mtime` in whole seconds (what timestamp pycs record).
    pub fn mtime_secs(&self) -> i64 {
        self.mtime_ns.div_euclid(1_000_000_000)
    }
}

/// One entry of a directory listing.
pub(crate) struct Listed {
    pub name: OsString,
    pub kind: FileType,
}

impl Under {
    /// Opens `root` (following symlinks) as the base of a tree whose
    /// nodes the kernel reaches itself, following the tree's symlinks
    /// through the view (the overlay): no symlink on the way to a node is
    /// followed here.
    pub fn open(root: &Path) -> io::Result<Under> {
        Self::open_with(root, false)
    }

    /// [`Under::open`] for a view that mirrors a symlink to a directory as
    /// the directory (the pycache-prefix view: Python names a source's pyc
    /// after the path it imported the source by, symlinked directories
    /// included), which follows such symlinks on the way to a node.
    pub fn open_following_dirs(root: &Path) -> io::Result<Under> {
        Self::open_with(root, true)
    }

    fn open_with(root: &Path, follow_dirs: bool) -> io::Result<Under> {
        let base = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| with_path(e.into(), "open the directory", root))?;
        let real_root = fd_path(&base).map_err(|e| with_path(e, "resolve", root))?;
        Ok(Under {
            base,
            root: root.to_path_buf(),
            real_root,
            follow_dirs,
            mounts: Default::default(),
            covering: None,
        })
    }

    /// Marks the tree as covered by the view's own mount (`--over`).
    pub fn covered(mut self) -> Under {
        self.covering = Some(std::sync::OnceLock::new());
        self
    }

    /// Whether `(dev, ino)` is the root of the mount over the tree
    /// (`--over`), seen by path without asking the server anything.
    fn covers_base(&self, dev: u64, ino: u64) -> bool {
        let Some(covering) = &self.covering else {
            return false;
        };
        let root = covering.get_or_init(|| {
            rustix::fs::statx(
                rustix::fs::CWD,
                &self.root,
                AtFlags::STATX_DONT_SYNC,
                StatxFlags::INO,
            )
            .ok()
            // A FUSE root is node 1: whatever else a renamed ancestor put
            // at that path is not the mount.
            .filter(|st| st.stx_ino == 1)
            .map(|st| {
                (
                    rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
                    st.stx_ino,
                )
            })
        });
        *root == Some((dev, ino))
    }

    /// The path of `rel` as it was before mounting (for messages and for
    /// naming compiled files).
    pub fn display_path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// A path to `rel` for other processes that reaches the tree through
    /// this process's descriptor (`/proc/PID/fd/N/REL`), not through the
    /// path a mount may cover.
    pub fn descriptor_path(&self, rel: &Path) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.base.as_raw_fd()
        ))
        .join(rel)
    }

    /// Calls `op` with the directory holding `rel` and `rel`'s last
    /// component. The directory is reached from the base without following
    /// any symlink (`RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`): the kernel
    /// resolves the tree's symlinks itself, through the view, so a
    /// directory of the tree swapped for a symlink after the kernel cached
    /// it (to `/proc/self` or `/root`) leads nowhere, instead of to a file
    /// outside the tree opened as the mount's owner. Only `op` decides
    /// whether the last component is followed. (A view that follows
    /// symlinked directories, [`Under::open_following_dirs`], resolves
    /// `rel` with [`Under::open_from`] instead.)
    fn at<T>(
        &self,
        rel: &Path,
        op: impl FnOnce(std::os::fd::BorrowedFd<'_>, &Path) -> rustix::io::Result<T>,
    ) -> io::Result<T> {
        match (rel.parent(), rel.file_name()) {
            (Some(parent), Some(name)) if !parent.as_os_str().is_empty() && !self.follow_dirs => {
                let dir = pycstore_store::tree::open_dir_beneath(self.base.as_fd(), parent)?;
                Ok(op(dir.as_fd(), Path::new(name))?)
            }
            _ => Ok(op(self.base.as_fd(), arg(rel))?),
        }
    }

    /// Opens `rel` beneath `start` with `flags`, following symlinks (the
    /// final one unless `flags` has `O_NOFOLLOW`), never into a pycstore
    /// mount: the view's own mount point, reached by another path (a
    /// symlink such as `/var/run`, `/proc/self/root`, or a source of the
    /// tree symlinked through the mount), would make this request wait on
    /// another one of the same server, nested once per pass through the
    /// mount or once per concurrent request, until every thread waits and
    /// the view hangs for everyone. A path that stays on one filesystem is
    /// opened by the kernel in one call (`RESOLVE_NO_XDEV`); one that
    /// crosses a mount is walked a component at a time ([`Under::walk`]),
    /// and reopened through its descriptor.
    fn open_from(
        &self,
        start: std::os::fd::BorrowedFd<'_>,
        rel: &Path,
        flags: OFlags,
    ) -> io::Result<OwnedFd> {
        let flags = flags | OFlags::CLOEXEC;
        match rustix::fs::openat2(start, arg(rel), flags, Mode::empty(), ResolveFlags::NO_XDEV) {
            // Across a mount; or no openat2 (before Linux 5.6, or a
            // seccomp filter that refuses it): walked.
            Err(rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {}
            opened => return Ok(opened?),
        }
        let fd = self.walk(
            start,
            rel,
            !flags.contains(OFlags::NOFOLLOW),
            flags.contains(OFlags::DIRECTORY),
        )?;
        if flags.contains(OFlags::PATH) {
            return Ok(fd);
        }
        let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        if kind == FileType::Symlink {
            return Err(rustix::io::Errno::LOOP.into());
        }
        if flags.contains(OFlags::DIRECTORY) && kind != FileType::Directory {
            return Err(rustix::io::Errno::NOTDIR.into());
        }
        reopen(&fd, flags - OFlags::NOFOLLOW)
    }

    /// Resolves `rel` from `start` one component at a time, following
    /// symlinks (the final one only if `follow_final`), to an `O_PATH`
    /// descriptor. Each step is opened with `O_NOFOLLOW` (and, with more to
    /// come, `O_DIRECTORY`, which triggers an automount) and looked at with
    /// `statx(AT_STATX_DONT_SYNC)`, which asks no FUSE server anything; a
    /// step onto a filesystem [`Under::may_enter`] refuses ends the walk
    /// with `ELOOP` before anything in it is looked up.
    fn walk(
        &self,
        start: std::os::fd::BorrowedFd<'_>,
        rel: &Path,
        follow_final: bool,
        want_dir: bool,
    ) -> io::Result<OwnedFd> {
        let open = |dir: &OwnedFd, name: &OsStr| {
            rustix::fs::openat(
                dir,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        let look = |fd: &OwnedFd| {
            rustix::fs::statx(
                fd,
                "",
                AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
                StatxFlags::TYPE | StatxFlags::INO,
            )
            .map(|st| {
                (
                    FileType::from_raw_mode(st.stx_mode.into()),
                    rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
                    st.stx_ino,
                )
            })
        };
        let mut pending: Vec<OsString> = components(rel);
        pending.reverse();
        let mut current = dir_path_fd(start, ".")?;
        let (_, mut dev, _) = look(&current)?;
        let mut hops = 0;
        while let Some(name) = pending.pop() {
            // A step with more after it (or the last one, when a directory
            // is wanted) is opened as a directory first: only a lookup that
            // wants a directory triggers an automount point (autofs, NFS),
            // as the kernel's own walk would.
            let as_dir = match pending.is_empty() && !want_dir {
                true => None,
                false => match rustix::fs::openat(
                    &current,
                    &name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => Some(fd),
                    Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => None,
                    Err(e) => return Err(e.into()),
                },
            };
            let mut next = match as_dir {
                Some(fd) => fd,
                None => open(&current, &name)?,
            };
            let (mut kind, mut next_dev, ino) = look(&next)?;
            if next_dev != dev && self.covers_base(next_dev, ino) {
                // Under `--over`, a `..` or an absolute path that comes back
                // to the tree's root lands on the mount: the tree is the
                // directory underneath, which the base holds.
                next = dir_path_fd(&self.base, ".")?;
                (kind, next_dev, _) = look(&next)?;
            } else if next_dev != dev && !self.may_enter(next_dev) {
                tracing::debug!(
                    "`{}` leads into a pycstore mount or another user's FUSE mount: not followed",
                    self.display_path(rel).display()
                );
                return Err(rustix::io::Errno::LOOP.into());
            }
            if kind == FileType::Symlink && (follow_final || !pending.is_empty()) {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(rustix::io::Errno::LOOP.into());
                }
                let target = rustix::fs::readlinkat(&next, "", Vec::new())?;
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                if target.has_root() {
                    current = dir_path_fd(rustix::fs::CWD, "/")?;
                    dev = look(&current)?.1;
                }
                pending.extend(components(&target).into_iter().rev());
                continue;
            }
            current = next;
            dev = next_dev;
        }
        Ok(current)
    }

    /// Whether a walk may enter the filesystem of device `dev`, and a
    /// file on it be trusted to be what its attributes say: not a pycstore
    /// mount (this view, or another that could lead back into it), nor a
    /// FUSE mount of a user other than root and this process's, whose
    /// server could answer anything, or never answer and hold a request
    /// thread for good. Only anonymous devices (major 0) can be either.
    pub fn may_enter(&self, dev: u64) -> bool {
        if rustix::fs::major(dev) != 0 {
            return true;
        }
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = mounts
            .read_at
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1));
        if let (true, Some(&verdict)) = (fresh, mounts.verdicts.get(&dev)) {
            return verdict;
        }
        mounts.verdicts = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|info| mount_verdicts(&info, rustix::process::geteuid().as_raw()))
            .unwrap_or_default();
        mounts.read_at = Some(std::time::Instant::now());
        // Not listed: no mount of its own (a btrfs subvolume, a layer of an
        // overlay), so no FUSE server of its own either.
        *mounts.verdicts.entry(dev).or_insert(true)
    }

    /// Opens `rel` with `flags` (which say whether a final symlink is
    /// followed): through [`Under::at`], or, in a view that follows
    /// symlinked directories, with [`Under::open_from`] the base.
    fn open_at(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        if self.follow_dirs {
            return self.open_from(self.base.as_fd(), rel, flags);
        }
        if flags.contains(OFlags::NOFOLLOW) {
            return self.at(rel, |dir, name| {
                rustix::fs::openat(dir, name, flags | OFlags::CLOEXEC, Mode::empty())
            });
        }
        // A final symlink is followed as the pycache-prefix view follows
        // paths: a source of the tree symlinked through the mount itself
        // must not make this request wait on the server's own threads.
        self.at(rel, |dir, name| {
            self.open_from(dir, name, flags)
                .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
        })
    }

    /// `lstat` of `rel` (a symlink is reported as itself), its mode
    /// narrowed by its ACL ([`narrow_by_acl`]).
    pub fn lstat(&self, rel: &Path) -> io::Result<Meta> {
        self.stat_with(rel, false)
    }

    /// `stat` of `rel`, following a final symlink, its mode narrowed by its
    /// ACL ([`narrow_by_acl`]).
    pub fn stat(&self, rel: &Path) -> io::Result<Meta> {
        self.stat_with(rel, true)
    }

    fn stat_with(&self, rel: &Path, follow: bool) -> io::Result<Meta> {
        // The mode and the ACL of one file: both through one descriptor, so
        // a symlink flipped between the two cannot pair one file's mode
        // with another's (missing) ACL.
        let flags = if follow {
            OFlags::PATH
        } else {
            OFlags::PATH | OFlags::NOFOLLOW
        };
        Ok(stat_with_acl(&self.open_at(rel, flags)?)?)
    }

    /// Opens a regular file for reading; a final symlink is refused (the
    /// kernel follows symlinks itself, through the view), and so is
    /// anything else that is not a regular file: opened with `O_NONBLOCK`,
    /// a FIFO swapped in for a file the kernel looked up cannot hold a
    /// request thread waiting for a writer.
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        let fd = self.open_at(
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK,
        )?;
        if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        // O_NONBLOCK kept: reads of a regular file ignore it (and one of a
        // pseudo-filesystem that would block fails instead), as in `read`.
        Ok(File::from(fd))
    }

    /// Reads a whole file, following a final symlink (a source file may be
    /// one).
    pub fn read(&self, rel: &Path) -> io::Result<(Meta, Vec<u8>)> {
        // Only a regular file of at most the link's source size limit is
        // read, and nothing else is even opened: found with O_PATH (which
        // opens nothing), checked, then opened through that descriptor, so
        // a source swapped for a symlink to a FIFO or a device (whose open
        // alone can block, or act, as root) is refused unopened.
        let found = self.open_at(rel, OFlags::PATH)?;
        let st = rustix::fs::fstat(&found)?;
        let limit = pycstore_store::MAX_SOURCE_SIZE;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size as u64 > limit
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file of at most the source size limit",
            ));
        }
        // O_NONBLOCK kept: a regular file of a pseudo-filesystem that
        // blocks reads (`/proc/kmsg`) fails instead of holding the thread.
        let fd = reopen(&found, OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK)?;
        let meta = with_acl(Meta::from_stat(&st), |buf| {
            rustix::fs::fgetxattr(&fd, ACL_XATTR, buf)
        });
        let mut bytes = Vec::with_capacity(meta.size as usize);
        File::from(fd).take(limit + 1).read_to_end(&mut bytes)?;
        Ok((meta, bytes))
    }

    /// For a symlink `rel` to a file or directory whose stat is `target`:
    /// the permission bits (a mask of `0o777`) left to each class of
    /// `target` by the directories on the way to the symlink's real target,
    /// which a reader of the view never passes through (the view shows the
    /// target's own attributes where the symlink is, so the kernel checks
    /// only the symlink's side of the path). Conservative: a class keeps its
    /// bits only if every one of those directories lets all its members
    /// search, whichever class of the directory they fall in.
    pub fn reach_mask(&self, rel: &Path, target: &Meta) -> io::Result<u32> {
        let fd = self.open_at(rel, OFlags::PATH)?;
        let real = fd_path(&fd)?;
        let mut mask = 0o777;
        let mut slash = None;
        for dir in real.ancestors().skip(1) {
            // Inside the tree, a directory is reached through the base (a
            // mount `--over` the tree covers its path).
            let meta = match dir.strip_prefix(&self.real_root) {
                Ok(inside) => self.stat(inside)?,
                // Outside, reached from `/` as the views follow paths: a
                // path the kernel named may lead through a mount by now.
                Err(_) => {
                    let root = match &mut slash {
                        Some(root) => root,
                        None => slash.insert(dir_path_fd(rustix::fs::CWD, "/")?),
                    };
                    let inside = dir.strip_prefix("/").unwrap_or(dir);
                    stat_with_acl(&self.open_from(root.as_fd(), inside, OFlags::PATH)?)?
                }
            };
            mask &= searchable_by(&meta, target);
        }
        Ok(mask)
    }

    /// The target of a symlink.
    pub fn readlink(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let fd = self.open_at(rel, OFlags::PATH | OFlags::NOFOLLOW)?;
        Ok(rustix::fs::readlinkat(&fd, "", Vec::new())?.into_bytes())
    }

    /// The entries of a directory, without `.` and `..`.
    pub fn list(&self, rel: &Path) -> io::Result<Vec<Listed>> {
        let fd = self.open_at(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::new(fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let mut kind = entry.file_type();
            if kind == FileType::Unknown {
                let child = rel.join(OsStr::from_bytes(name));
                kind = self
                    .lstat(&child)
                    .map(|m| m.file_type())
                    .unwrap_or(FileType::Unknown);
            }
            out.push(Listed {
                name: OsStr::from_bytes(name).to_os_string(),
                kind,
            });
        }
        Ok(out)
    }
}

/// The classes of `file` (`0o700` owner, `0o070` group, `0o007` others)
/// whose every member can search the directory `dir`. A user's groups
/// are not known here: a class counts as able to search only when it can
/// whichever class of `dir` its members fall in.
fn searchable_by(dir: &Meta, file: &Meta) -> u32 {
    let x = |bits: u32| dir.mode & bits == bits;
    let everyone = x(0o111);
    let owner = file.uid == 0
        || everyone
        || (dir.uid == file.uid && x(0o100))
        || (dir.uid != file.uid && x(0o011));
    let group = everyone || (dir.gid == file.gid && x(0o110));
    (if owner { 0o700 } else { 0 })
        | (if group { 0o070 } else { 0 })
        | (if everyone { 0o007 } else { 0 })
}

/// `fstat` of `fd` (an `O_PATH` descriptor will do), its mode narrowed by
/// the file's ACL, read through `/proc/self/fd` (an `O_PATH` descriptor has
/// no xattrs of its own; a symlink has no ACL and is not read).
fn stat_with_acl(fd: &OwnedFd) -> rustix::io::Result<Meta> {
    use std::os::fd::AsRawFd;
    let meta = Meta::from_stat(&rustix::fs::fstat(fd)?);
    Ok(with_acl(meta, |buf| {
        rustix::fs::getxattr(format!("/proc/self/fd/{}", fd.as_raw_fd()), ACL_XATTR, buf)
    }))
}

/// The extended attribute holding a file's POSIX access ACL.
const ACL_XATTR: &str = "system.posix_acl_access";

/// `meta` with its mode narrowed by the access ACL `get` reads into the
/// buffer it is given (nothing to narrow without one: no ACL, no xattr
/// support, or a mode that gives group and others nothing).
fn with_acl(mut meta: Meta, get: impl FnOnce(&mut [u8]) -> rustix::io::Result<usize>) -> Meta {
    if meta.mode & 0o077 == 0 || meta.file_type() == FileType::Symlink {
        return meta;
    }
    let mut buf = [0u8; 512];
    match get(&mut buf) {
        Ok(n) => meta.mode = narrow_by_acl(meta.mode, &buf[..n]),
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => {}
        // Unreadable or larger than any ACL this reads: the owner only.
        Err(_) => meta.mode &= !0o077,
    }
    meta
}

/// The mode bits a view may show for a file whose POSIX access ACL is
/// `acl` (the `system.posix_acl_access` value), given its `mode`. The
/// views answer with mode bits, which the kernel checks for every reader
/// (`default_permissions`), and mode bits cannot say what an ACL's named
/// entries do: `user:bob:---` denies bob what others may, and a `group::`
/// entry narrower than the mask (the mode's group bits) denies the owning
/// group what the mode shows. So the group bits become what every member
/// of the owning group gets whoever else they are (`group::`, and every
/// named user's entry, under the mask), and the other bits what everyone
/// gets (`other::`, and every named entry under the mask): never more than
/// the ACL grants anyone. What named entries grant beyond that is not
/// shown: those users get `EACCES` from the view (for a pyc, Python
/// compiles the source itself).
pub(crate) fn narrow_by_acl(mode: u32, acl: &[u8]) -> u32 {
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    let owner_only = mode & !0o077;
    if acl.len() < 4 || u32::from_le_bytes([acl[0], acl[1], acl[2], acl[3]]) != 2 {
        return owner_only;
    }
    let (mut group_obj, mut mask, mut other) = (7u32, 7u32, 7u32);
    // The AND of the named users' and the named groups' entries: what the
    // least of them gets.
    let (mut named_users, mut named_groups) = (None::<u32>, None::<u32>);
    let entries = acl[4..].chunks_exact(8);
    if !entries.remainder().is_empty() {
        return owner_only;
    }
    for e in entries {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u32::from(u16::from_le_bytes([e[2], e[3]])) & 7;
        match tag {
            USER => named_users = Some(named_users.unwrap_or(7) & perm),
            GROUP_OBJ => group_obj = perm,
            GROUP => named_groups = Some(named_groups.unwrap_or(7) & perm),
            MASK => mask = perm,
            OTHER => other = perm,
            _ => {}
        }
    }
    let least_user = named_users.map_or(7, |p| p & mask);
    let least_group = named_groups.map_or(7, |p| p & mask);
    let group = group_obj & mask & least_user;
    let everyone = other & least_user & least_group;
    (mode & !0o077) | (mode & 0o070 & (group << 3)) | (mode & 0o007 & everyone)
}

/// For each filesystem with an anonymous device in `mountinfo` (the text
/// of `/proc/self/mountinfo`): whether a walk may enter it, for a server
/// run by user `me` ([`Under::may_enter`]).
fn mount_verdicts(mountinfo: &str, me: u32) -> std::collections::HashMap<u64, bool> {
    let mut out = std::collections::HashMap::new();
    for m in crate::mount::mount_lines(mountinfo).filter(|m| m.dev.0 == 0) {
        let may = if m.is_pycstore() {
            false
        } else if m.fstype.starts_with("fuse") {
            // A FUSE server runs as the user who mounted it.
            m.options
                .split(',')
                .find_map(|o| o.strip_prefix("user_id="))
                .and_then(|u| u.parse::<u32>().ok())
                .is_some_and(|uid| uid == 0 || uid == me)
        } else {
            true
        };
        // The same device mounted twice: the stricter verdict.
        let verdict = out
            .entry(rustix::fs::makedev(m.dev.0, m.dev.1))
            .or_insert(may);
        *verdict &= may;
    }
    out
}

/// An `O_PATH` descriptor of the directory `path` (relative to `start`).
fn dir_path_fd(start: impl AsFd, path: &str) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        start,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the file an `O_PATH` descriptor stands for, with `flags`: no name
/// is looked up, so it is that file whatever its path leads to now.
fn reopen(fd: &OwnedFd, flags: OFlags) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    Ok(rustix::fs::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The path the kernel gives an open descriptor, every symlink resolved.
fn fd_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The relative path as an argument of the `*at` calls: `.` for the base.
fn arg(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

use pycstore_store::python_trust::{components, MAX_SYMLINKS};
use pycstore_store::util::with_path;

#[cfg(test)]
mod tests {
    use super::{mount_verdicts, narrow_by_acl, Under};
    use std::path::Path;

    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;

    fn acl(entries: &[(u16, u16)]) -> Vec<u8> {
        let mut out = 2u32.to_le_bytes().to_vec();
        for (tag, perm) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&1000u32.to_le_bytes());
        }
        out
    }

    #[test]
    fn the_mode_shows_no_class_more_than_the_acl_gives_any_of_its_members() {
        let minimal = acl(&[(USER_OBJ, 6), (GROUP_OBJ, 4), (OTHER, 4)]);
        assert_eq!(narrow_by_acl(0o100644, &minimal), 0o100644);
        // user:bob:--- denies bob what others get.
        let deny_user = acl(&[
            (USER_OBJ, 6),
            (USER, 0),
            (GROUP_OBJ, 4),
            (MASK, 4),
            (OTHER, 4),
        ]);
        assert_eq!(narrow_by_acl(0o100644, &deny_user), 0o100600);
        // group::--- with a named group granting r: the mask shows r.
        let narrow_group = acl(&[
            (USER_OBJ, 6),
            (GROUP_OBJ, 0),
            (GROUP, 4),
            (MASK, 4),
            (OTHER, 0),
        ]);
        assert_eq!(narrow_by_acl(0o100640, &narrow_group), 0o100600);
        // group:staff:--x on a 0755 directory: staff may not list it.
        let deny_group = acl(&[
            (USER_OBJ, 7),
            (GROUP_OBJ, 5),
            (GROUP, 1),
            (MASK, 5),
            (OTHER, 5),
        ]);
        assert_eq!(narrow_by_acl(0o040755, &deny_group), 0o040751);
        // A named entry granting more than the classes changes nothing.
        let grant = acl(&[
            (USER_OBJ, 6),
            (USER, 6),
            (GROUP_OBJ, 4),
            (MASK, 6),
            (OTHER, 4),
        ]);
        assert_eq!(narrow_by_acl(0o100664, &grant), 0o100644);
        // Unknown or damaged: the owner only.
        assert_eq!(narrow_by_acl(0o100644, b"\x03\0\0\0"), 0o100600);
        assert_eq!(narrow_by_acl(0o100644, &minimal[..7]), 0o100600);
    }

    #[test]
    fn walks_enter_no_pycstore_mount_nor_another_users_fuse_mount() {
        let info = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /tmp rw shared:2 - tmpfs tmpfs rw
40 22 0:40 / /run/pycs rw,nosuid,nodev - fuse pycstore rw,user_id=0,group_id=0
41 22 0:41 / /home/bob/mnt rw,nosuid,nodev - fuse.sshfs bob@host:/ rw,user_id=1000,group_id=1000
42 22 0:42 / /srv/data rw,nosuid,nodev - fuse.sshfs root@host:/ rw,user_id=0,group_id=0
43 22 0:43 / /home/alice/mnt rw,nosuid,nodev - fuse.sshfs x rw,user_id=1001,group_id=1001
44 22 0:44 / /run/other rw - fuse.pycstore pycstore rw,user_id=1001,group_id=1001
";
        let dev = |minor| rustix::fs::makedev(0, minor);
        let v = mount_verdicts(info, 1001);
        assert_eq!(v.get(&dev(26)), Some(&true), "tmpfs");
        assert_eq!(v.get(&dev(40)), Some(&false), "a pycstore view");
        assert_eq!(v.get(&dev(41)), Some(&false), "another user's FUSE");
        assert_eq!(v.get(&dev(42)), Some(&true), "root's FUSE");
        assert_eq!(v.get(&dev(43)), Some(&true), "this user's FUSE");
        assert_eq!(v.get(&dev(44)), Some(&false), "this user's pycstore view");
        assert_eq!(v.len(), 6, "only anonymous devices: {v:?}");
    }

    /// A device no mount lists (a btrfs subvolume's, an overlay layer's)
    /// has no FUSE server of its own: entered.
    #[test]
    fn a_device_no_mount_lists_is_entered() {
        let under = Under::open(Path::new("/")).unwrap();
        assert!(under.may_enter(rustix::fs::makedev(0, 0xfffff)));
        assert!(under.may_enter(rustix::fs::makedev(8, 1)));
    }

    /// A source swapped for a symlink to a FIFO is refused without being
    /// opened: a writer waiting for a reader to open the FIFO still waits.
    #[test]
    fn reading_a_source_swapped_for_a_fifo_opens_nothing() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(&fifo, dir.path().join("mod.py")).unwrap();
        let opened = Arc::new(AtomicBool::new(false));
        let writer = {
            let (fifo, opened) = (fifo.clone(), Arc::clone(&opened));
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&fifo);
                opened.store(true, Ordering::SeqCst);
                drop(f);
            })
        };
        // The writer waits in its open.
        std::thread::sleep(std::time::Duration::from_millis(200));
        for under in [
            Under::open(dir.path()).unwrap(),
            Under::open_following_dirs(dir.path()).unwrap(),
        ] {
            assert!(under.read(Path::new("mod.py")).is_err());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !opened.load(Ordering::SeqCst),
            "reading the source opened the FIFO"
        );
        // Lets the writer go.
        drop(std::fs::File::open(&fifo).unwrap());
        writer.join().unwrap();
    }
}
