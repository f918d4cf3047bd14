//! Finding the sources of a prefix: every `*.py` file, the way `compileall`
//! finds them (directory symlinks are not followed, `__pycache__` is skipped),
//! minus what the user excluded. Unreadable directories and other walk errors
//! are reported per path, never the end of the walk.

use std::ffi::{OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rustix::fs::{AtFlags, FileType, Mode, RawDir};

use crate::error::{Cause, FileError, Op};
use crate::tree;
use crate::{Error, Result};

/// A directory of a prefix that holds sources, opened relative to its
/// parent without following symlinks (see [`tree`]): every pyc of its
/// sources is written through it.
pub struct SourceDir {
    /// The path as reached from the prefix, for messages and the index.
    pub path: PathBuf,
    fd: OwnedFd,
    /// The device of the directory: where its pycs are written.
    pub dev: u64,
    /// The directory's owner.
    pub uid: u32,
    /// The directory's group.
    pub gid: u32,
    /// Whether the walk's listing of the directory held a `__pycache__`:
    /// when not, the sources are most likely new to the store (read them at
    /// once rather than stat them first) and the directory is made without
    /// trying to open it first.
    pub listed_pycache: bool,
    pycache: OnceLock<std::result::Result<Option<Pycache>, FileError>>,
}

/// A source directory's `__pycache__`, open.
struct Pycache {
    fd: OwnedFd,
    /// Made by this run: empty when it was made, so a pyc is linked at its
    /// name without looking there first.
    made: bool,
}

/// A source directory's `__pycache__` as [`SourceDir::pycache`] found it.
pub struct PycacheDir<'a> {
    /// The directory, open; `None` when it does not exist and was not to
    /// be made.
    pub fd: Option<BorrowedFd<'a>>,
    /// Whether this run made it (then it was empty, and whatever is there
    /// now was placed by this run or raced in since).
    pub made: bool,
    /// Whether this very call made it: true for one call per directory.
    pub first: bool,
}

impl SourceDir {
    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Its `__pycache__`, opened without following a symlink, and whether
    /// this run made it. With `create`, a missing one is made (mode 0777
    /// less the umask, as Python makes it); without, it is `None`. The first
    /// call decides for the directory's lifetime: one run asks one way. An
    /// error is this directory's: report it under each source with
    /// [`FileError::at`].
    pub fn pycache(&self, create: bool) -> std::result::Result<PycacheDir<'_>, FileError> {
        let mut first = false;
        let opened = self.pycache.get_or_init(|| {
            let name = OsStr::new("__pycache__");
            let is_symlink = || {
                rustix::fs::statat(self.fd(), name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
            };
            let fail = |op: fn(PathBuf) -> Op, cause: Cause| {
                FileError::new(&self.path, op(self.path.join(name)), cause)
            };
            let refuse = |e: std::io::Error| match e.raw_os_error() {
                Some(libc::ELOOP | libc::ENOTDIR) if is_symlink() => {
                    fail(Op::OpenPycache, Cause::Symlink)
                }
                Some(libc::ENOTDIR) => fail(Op::OpenPycache, Cause::NotADirectory),
                _ => fail(Op::OpenPycache, e.into()),
            };
            let make = || match rustix::fs::mkdirat(self.fd(), name, Mode::from_raw_mode(0o777)) {
                Ok(()) => Ok(true),
                Err(rustix::io::Errno::EXIST) => Ok(false),
                Err(e) => Err(fail(Op::MakePycache, e.into())),
            };
            // One attempt per directory: make it when the listing had none.
            if !create && !self.listed_pycache {
                return Ok(None);
            }
            if create && !self.listed_pycache {
                let made = make()?;
                first = made;
                return tree::open_dir(self.fd(), name)
                    .map(|fd| Some(Pycache { fd, made }))
                    .map_err(refuse);
            }
            match tree::open_dir(self.fd(), name) {
                Ok(fd) => Ok(Some(Pycache { fd, made: false })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                    let made = make()?;
                    first = made;
                    tree::open_dir(self.fd(), name)
                        .map(|fd| Some(Pycache { fd, made }))
                        .map_err(refuse)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(refuse(e)),
            }
        });
        match opened {
            Ok(pycache) => Ok(PycacheDir {
                fd: pycache.as_ref().map(|p| p.fd.as_fd()),
                made: pycache.as_ref().is_some_and(|p| p.made),
                first,
            }),
            Err(e) => Err(e.clone()),
        }
    }
}

/// A source file found by the walk.
#[derive(Clone)]
pub struct Found {
    /// The path as reached from the prefix (a symlinked file keeps its own
    /// name: its pyc goes beside the link).
    pub path: PathBuf,
    /// The directory holding it.
    pub dir: Arc<SourceDir>,
    /// Its name in that directory.
    pub name: OsString,
    /// Whether the name is a symlink (to a regular file): then it is
    /// stat'ed before it is opened, and opened following the link.
    pub symlink: bool,
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found").field("path", &self.path).finish()
    }
}

/// Exclude patterns. A pattern with a `/` is matched against the path
/// relative to the prefix; one without is matched against every file and
/// directory name (`tests` excludes every `tests` directory).
pub struct Excludes {
    by_path: GlobSet,
    by_name: GlobSet,
}

impl Excludes {
    /// Compiles the patterns.
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut by_path = GlobSetBuilder::new();
        let mut by_name = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = GlobBuilder::new(pattern.trim_end_matches('/'))
                .literal_separator(true)
                .build()
                .map_err(|e| Error::Pattern {
                    pattern: pattern.clone(),
                    message: e.kind().to_string(),
                })?;
            if pattern.trim_end_matches('/').contains('/') {
                by_path.add(glob);
            } else {
                by_name.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| b.build().expect("globs compiled one by one above");
        Ok(Excludes {
            by_path: build(by_path),
            by_name: build(by_name),
        })
    }

    fn excluded(&self, relative: &Path) -> bool {
        self.by_path.is_match(relative)
            || relative
                .file_name()
                .is_some_and(|name| self.by_name.is_match(name))
    }
}

/// Walks `prefix` through directory descriptors (never following a
/// symlinked directory, skipping `__pycache__`), returning the sources and
/// the paths that could not be read or are not regular files.
pub fn walk(prefix: &Path, excludes: &Excludes) -> (Vec<Found>, Vec<FileError>) {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    let root = match tree::open_root(prefix) {
        Ok(fd) => fd,
        Err(e) => {
            errors.push(FileError::new(prefix, Op::Read, e));
            return (found, errors);
        }
    };
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut pending = vec![(prefix.to_path_buf(), root)];
    while let Some((path, fd)) = pending.pop() {
        let mut entries = match read_entries(fd.as_fd(), &mut buf) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(FileError::new(path, Op::Read, e));
                continue;
            }
        };
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let listed_pycache = entries.iter().any(|(name, _)| name == "__pycache__");
        let mut subdirs = Vec::new();
        let mut sources = Vec::new();
        for (name, mut kind) in entries {
            let child = path.join(&name);
            let relative = child.strip_prefix(prefix).unwrap_or(&child);
            if kind == FileType::Unknown {
                match rustix::fs::statat(&fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => kind = FileType::from_raw_mode(st.st_mode),
                    Err(_) => continue,
                }
            }
            if kind == FileType::Directory {
                if name == "__pycache__" || excludes.excluded(relative) {
                    continue;
                }
                match tree::open_dir(fd.as_fd(), &name) {
                    Ok(fd) => subdirs.push((child, fd)),
                    // Swapped for a symlink or a file since it was listed:
                    // not a directory of this prefix any more.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => errors.push(FileError::new(child, Op::Read, e)),
                }
                continue;
            }
            let is_py = name
                .as_bytes()
                .strip_suffix(b".py")
                .is_some_and(|stem| !stem.is_empty());
            if !is_py || excludes.excluded(relative) {
                continue;
            }
            let target = match kind {
                // A symlink counts when it leads to a regular file, as for
                // compileall; a dangling one or a loop is no source.
                FileType::Symlink => {
                    match rustix::fs::statat(&fd, name.as_os_str(), AtFlags::empty()) {
                        Ok(st) => FileType::from_raw_mode(st.st_mode),
                        Err(_) => continue,
                    }
                }
                kind => kind,
            };
            if target != FileType::RegularFile {
                errors.push(FileError::new(child, Op::Read, Cause::NotRegular));
                continue;
            }
            sources.push((child, name, kind == FileType::Symlink));
        }
        // Depth first, in name order.
        pending.extend(subdirs.into_iter().rev());
        // Only a directory that holds sources is kept open, and stat'ed.
        if sources.is_empty() {
            continue;
        }
        let stat = match rustix::fs::fstat(&fd) {
            Ok(stat) => stat,
            Err(e) => {
                errors.push(FileError::new(path, Op::Read, e));
                continue;
            }
        };
        let dir = Arc::new(SourceDir {
            path,
            fd,
            dev: stat.st_dev,
            uid: stat.st_uid,
            gid: stat.st_gid,
            listed_pycache,
            pycache: OnceLock::new(),
        });
        found.extend(sources.into_iter().map(|(path, name, symlink)| Found {
            path,
            dir: Arc::clone(&dir),
            name,
            symlink,
        }));
    }
    (found, errors)
}

/// The names and types of a directory's entries, without `.` and `..`.
fn read_entries(
    fd: BorrowedFd<'_>,
    buf: &mut [MaybeUninit<u8>],
) -> std::io::Result<Vec<(OsString, FileType)>> {
    let mut entries = Vec::new();
    let mut dir = RawDir::new(fd, buf);
    while let Some(entry) = dir.next() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        entries.push((OsStr::from_bytes(name).to_os_string(), entry.file_type()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sources_skips_pycache_and_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for p in [
            "a.py",
            "pkg/b.py",
            "pkg/tests/c.py",
            "pkg/__pycache__/d.py",
            "pkg/e.txt",
            "sub/f.py",
        ] {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        std::os::unix::fs::symlink(root.join("sub"), root.join("linked")).unwrap();
        let excludes = Excludes::new(&["tests".into(), "sub/*.py".into()]).unwrap();
        let (found, errors) = walk(root, &excludes);
        let names: Vec<_> = found
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["a.py", "pkg/b.py"]);
        assert!(errors.is_empty());
        assert!(found.iter().all(|f| f.dir.dev != 0));
    }
}
