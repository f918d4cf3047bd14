//! Finding the sources of a prefix: every `*.py` file, the way `compileall`
//! finds them (directory symlinks are not followed, `__pycache__` is skipped),
//! minus what the user excluded. Unreadable directories and other walk errors
//! are reported per path, never the end of the walk.

use std::collections::LinkedList;
use std::ffi::{OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, RawDir};

use crate::error::{Cause, FileError, Op};
use crate::index::{Index, ListingRecord};
use crate::tree::{self, DirFd, Held};
use crate::util::joined;
use crate::{Error, Result};

/// A directory of a prefix that holds sources. Its descriptor is the one
/// the walk listed it through (opened relative to its parent without
/// following symlinks, see [`tree`]), or, for a directory the walk knew
/// unchanged from its listing record, opened on first use beneath the
/// prefix's root without following any symlink ([`tree::open_dir_beneath`])
/// and checked to be the directory listed. Every pyc of its sources is
/// written through it; what only reads (the `stat` of an unchanged source
/// or of a pyc in place) may go by path beneath the root instead.
pub struct SourceDir {
    /// The path as reached from the prefix, for messages and the index.
    pub path: PathBuf,
    /// The prefix's root, and the directory's path relative to it.
    root: Arc<OwnedFd>,
    relative: PathBuf,
    ino: u64,
    /// How many sources the walk found in it.
    sources: usize,
    /// The directory, held open: the walk's descriptor, or one opened
    /// beneath the root on first use (by a `stat`, unchecked). `None` when
    /// the budget of held descriptors had no room ([`Held`]): then it is
    /// opened for each use that writes, and `stat`ed through by path.
    fd: OnceLock<std::result::Result<Option<Held>, Failure>>,
    /// Whether `fd` is the directory the walk found (its device and inode),
    /// decided before anything is written through it.
    checked: OnceLock<std::result::Result<(), Failure>>,
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
    /// Whether the index has a listing record of this very directory (its
    /// device and inode at its path), current or not: an earlier walk
    /// listed it, so its sources may be in the stat cache. A directory new
    /// since (a fresh copy, a new install) has none, and neither have its
    /// sources (new files: new inodes). Not asked below a replaced
    /// directory ([`Child::ask`]): there it is false.
    pub seen_before: bool,
    pycache: OnceLock<std::result::Result<Option<Pycache>, FileError>>,
}

/// What [`SourceDir::listing_after_run`] made of a directory.
pub enum Relisting {
    /// Its listing record, to be trusted by the next walk.
    Record(ListingRecord),
    /// Changed too recently: to be listed after this time (nanoseconds
    /// since the epoch).
    After(i64),
}

/// An error kept for every later use of what failed.
type Failure = (std::io::ErrorKind, String);

fn failure(e: &std::io::Error) -> Failure {
    (e.kind(), e.to_string())
}

fn error((kind, message): &Failure) -> std::io::Error {
    std::io::Error::new(*kind, message.clone())
}

/// A source directory's `__pycache__`, found.
struct Pycache {
    fd: PycacheFd,
    /// Made by this run: empty when it was made, so a pyc is linked at its
    /// name without looking there first.
    made: bool,
}

/// How a found `__pycache__` is reached again.
enum PycacheFd {
    /// Held open.
    Held(Held),
    /// The budget had no room: opened for each use, and checked to be the
    /// directory first opened (its device and inode).
    Reopened((u64, u64)),
}

/// A source directory's `__pycache__` as [`SourceDir::pycache`] found it.
pub struct PycacheDir<'a> {
    /// The directory, open; `None` when it does not exist and was not to
    /// be made.
    pub fd: Option<DirFd<'a>>,
    /// Whether this run made it (then it was empty, and whatever is there
    /// now was placed by this run or raced in since).
    pub made: bool,
    /// Whether this very call made it: true for one call per directory.
    pub first: bool,
}

impl SourceDir {
    /// The directory's descriptor: the walk's, or opened beneath the
    /// prefix's root without following a symlink, and checked to be the
    /// directory listed. An error when it cannot be opened, or is no longer
    /// the directory listed (then its sources are picked up by the next
    /// run).
    pub fn fd(&self) -> std::io::Result<DirFd<'_>> {
        match self.held_or_error()? {
            Some(fd) => {
                self.checked
                    .get_or_init(|| self.is_listed(fd).map_err(|e| failure(&e)))
                    .as_ref()
                    .map_err(error)?;
                Ok(DirFd::Held(fd))
            }
            None => {
                let fd = self.open_beneath()?;
                self.is_listed(fd.as_fd())?;
                Ok(DirFd::Own(fd))
            }
        }
    }

    /// The held descriptor, opened on first use when the budget has room:
    /// `None` when it had none. Not checked to be the directory listed.
    fn held_or_error(&self) -> std::io::Result<Option<BorrowedFd<'_>>> {
        let held = self
            .fd
            .get_or_init(|| match Held::open(|| self.open_beneath()) {
                Some(Ok(fd)) => Ok(Some(fd)),
                Some(Err(e)) => Err(failure(&e)),
                None => Ok(None),
            });
        match held {
            Ok(fd) => Ok(fd.as_ref().map(AsFd::as_fd)),
            Err(f) => Err(error(f)),
        }
    }

    fn open_beneath(&self) -> std::io::Result<OwnedFd> {
        tree::open_dir_beneath(self.root.as_fd(), &self.relative)
    }

    /// Whether `fd` is the directory the walk listed.
    fn is_listed(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        is_same(fd, (self.dev, self.ino))
    }

    /// `stat` of the entry `name` (following a symlink unless `flags` says
    /// not to), through the directory's held descriptor: one path component
    /// for the kernel to walk rather than the whole path from the root. A
    /// directory not open yet is opened for it when it holds at least
    /// four sources (`STAT_THROUGH_DIR_MIN`): two `stat`s each, source and
    /// pyc, are then worth an `openat2` and a `close`. For reading only: the
    /// descriptor may not be checked yet (see [`SourceDir::fd`]). Else by
    /// path beneath the prefix's root (a directory above swapped for a
    /// symlink meanwhile is followed; nothing is written on the strength
    /// of it).
    pub fn stat_at(&self, name: &OsStr, flags: AtFlags) -> rustix::io::Result<rustix::fs::Stat> {
        let through_dir = match self.fd.get() {
            Some(held) => held.as_ref().ok().and_then(Option::as_ref).map(AsFd::as_fd),
            None if self.sources >= STAT_THROUGH_DIR_MIN => self.held_or_error().ok().flatten(),
            None => None,
        };
        match through_dir {
            Some(fd) => rustix::fs::statat(fd, name, flags),
            None => rustix::fs::statat(
                self.root.as_fd(),
                joined(&self.relative, &[name.as_bytes()]),
                flags,
            ),
        }
    }

    /// `lstat` of the pyc `name` in the directory's `__pycache__`: through
    /// the `__pycache__` this run opened, else through the directory (for
    /// reading only, as [`SourceDir::stat_at`]). `None` when there is no
    /// such file, or no `__pycache__` was listed.
    pub fn pyc_stat(&self, name: &OsStr) -> Option<rustix::fs::Stat> {
        let nofollow = AtFlags::SYMLINK_NOFOLLOW;
        let in_pycache = || joined(Path::new("__pycache__"), &[name.as_bytes()]);
        if let Some(Ok(pycache)) = self.pycache.get() {
            // One this run made held nothing of an earlier run.
            let pycache = pycache.as_ref().filter(|p| !p.made)?;
            return match &pycache.fd {
                PycacheFd::Held(fd) => rustix::fs::statat(fd, name, nofollow).ok(),
                PycacheFd::Reopened(_) => self.stat_at(in_pycache().as_os_str(), nofollow).ok(),
            };
        }
        if !self.listed_pycache {
            return None;
        }
        self.stat_at(in_pycache().as_os_str(), nofollow).ok()
    }

    /// A fresh listing record of the directory when this run made its
    /// `__pycache__` (which changed it since the walk listed it), so that
    /// the next walk need not list it again: its `stat`, then its entries.
    /// Only through the walk's descriptor, when it was held. A directory
    /// changed too recently for a listing taken `now_ns` to be trusted
    /// ([`crate::resolve::settled`]) is not listed: [`Relisting::After`]
    /// says when it can be.
    pub fn listing_after_run(&self, now_ns: i64) -> Option<Relisting> {
        let made = self.pycache.get()?.as_ref().ok()?.as_ref()?.made;
        let fd = self.fd.get()?.as_ref().ok()?.as_ref()?;
        if !made {
            return None;
        }
        let stat = rustix::fs::fstat(fd).ok()?;
        let (mtime_ns, ctime_ns) = times_ns(&stat);
        if !crate::resolve::settled(mtime_ns, ctime_ns, now_ns) {
            return Some(Relisting::After(crate::resolve::settles_after(
                mtime_ns, ctime_ns,
            )));
        }
        // The walk read this descriptor to its end.
        rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(0)).ok()?;
        let (listed, _) = LISTING
            .with(|buf| list(fd.as_fd(), &self.path, None, &mut buf.borrow_mut()))
            .ok()?;
        listed
            .rememberable
            .then(|| Relisting::Record(listed.record(&stat, now_ns)))
    }

    /// Its `__pycache__`, opened without following a symlink, and whether
    /// this run made it. With `create`, a missing one is made (mode 0777
    /// less the umask, as Python makes it); without, it is `None`. The first
    /// call decides for the directory's lifetime: one run asks one way. An
    /// error is this directory's: report it under each source with
    /// [`FileError::at`].
    pub fn pycache(&self, create: bool) -> std::result::Result<PycacheDir<'_>, FileError> {
        let name = OsStr::new("__pycache__");
        let fail = |op: fn(PathBuf) -> Op, cause: Cause| {
            FileError::new(&self.path, op(self.path.join(name)), cause)
        };
        let mut first = false;
        let opened = self.pycache.get_or_init(|| {
            // One attempt per directory: make it when the listing had none.
            if !create && !self.listed_pycache {
                return Ok(None);
            }
            let dir = self
                .fd()
                .map_err(|e| FileError::new(&self.path, Op::Read, e))?;
            let dir = dir.as_fd();
            let is_symlink = || {
                rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
            };
            let refuse = |e: std::io::Error| match e.raw_os_error() {
                Some(libc::ELOOP | libc::ENOTDIR) if is_symlink() => {
                    fail(Op::OpenPycache, Cause::Symlink)
                }
                Some(libc::ENOTDIR) => fail(Op::OpenPycache, Cause::NotADirectory),
                _ => fail(Op::OpenPycache, e.into()),
            };
            let make = || match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o777)) {
                Ok(()) => Ok(true),
                Err(rustix::io::Errno::EXIST) => Ok(false),
                Err(e) => Err(fail(Op::MakePycache, e.into())),
            };
            // Held when the budget has room; else its identity, to check
            // each later open against.
            let keep = |fd: OwnedFd, made: bool| {
                let fd = match Held::keep(fd) {
                    Ok(fd) => PycacheFd::Held(fd),
                    Err(fd) => match rustix::fs::fstat(&fd) {
                        Ok(st) => PycacheFd::Reopened((st.st_dev, st.st_ino)),
                        Err(e) => {
                            return Err(fail(Op::OpenPycache, std::io::Error::from(e).into()))
                        }
                    },
                };
                Ok(Some(Pycache { fd, made }))
            };
            if create && !self.listed_pycache {
                let made = make()?;
                first = made;
                let fd = tree::open_dir(dir, name).map_err(refuse)?;
                return keep(fd, made);
            }
            match tree::open_dir(dir, name) {
                Ok(fd) => keep(fd, false),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                    let made = make()?;
                    first = made;
                    let fd = tree::open_dir(dir, name).map_err(refuse)?;
                    keep(fd, made)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(refuse(e)),
            }
        });
        let pycache = match opened {
            Ok(Some(pycache)) => pycache,
            Ok(None) => {
                return Ok(PycacheDir {
                    fd: None,
                    made: false,
                    first,
                })
            }
            Err(e) => return Err(e.clone()),
        };
        let fd = match pycache.fd {
            PycacheFd::Held(ref fd) => DirFd::Held(fd.as_fd()),
            // Not held: opened again, and refused unless it is the one
            // first opened (never one swapped in since).
            PycacheFd::Reopened(id) => {
                let reopen = || -> std::io::Result<OwnedFd> {
                    let fd = tree::open_dir(self.fd()?.as_fd(), name)?;
                    is_same(fd.as_fd(), id)?;
                    Ok(fd)
                };
                DirFd::Own(reopen().map_err(|e| fail(Op::OpenPycache, e.into()))?)
            }
        };
        Ok(PycacheDir {
            fd: Some(fd),
            made: pycache.made,
            first,
        })
    }
}

/// The sources a directory not yet open must hold for its `stat`s to go
/// through a descriptor opened for them ([`SourceDir::stat_at`]). Each one
/// opened costs two syscalls (`openat2`, `close`) and saves the kernel a
/// walk of the path above it for each `stat`. A re-link of the reference
/// corpus (842 directories with sources, 6,990 sources; dist build, tmpfs,
/// 60 runs each, twice): CPU time 82.9 and 82.5 ms with 4 (about 480
/// directories opened, 19,400 syscalls in all), 97.5 and 97.4 ms with none
/// opened (18,870 syscalls); wall times within the machine's noise.
const STAT_THROUGH_DIR_MIN: usize = 4;

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

    /// Whether `path`, below `prefix`, is excluded. Without patterns (as
    /// usual), the path is not even made relative.
    fn excluded(&self, path: &Path, prefix: &Path) -> bool {
        if self.by_path.is_empty() && self.by_name.is_empty() {
            return false;
        }
        let relative = path.strip_prefix(prefix).unwrap_or(path);
        self.by_path.is_match(relative)
            || relative
                .file_name()
                .is_some_and(|name| self.by_name.is_match(name))
    }
}

/// What one walk found.
pub struct Walk {
    /// The sources, depth first in name order.
    pub found: Vec<Found>,
    /// Paths that could not be read, or are not regular files.
    pub(crate) errors: Vec<FileError>,
    /// Directories this walk listed, to remember ([`crate::index::Writes::listing`]).
    pub listed: Vec<(PathBuf, ListingRecord)>,
}

/// A directory's entries that matter to the walk.
struct Listed {
    pycache: bool,
    dirs: Vec<OsString>,
    /// Sources by name, and whether the name is a symlink.
    sources: Vec<(OsString, bool)>,
    /// Whether its record may stand for it while its `stat` is unchanged:
    /// not when a source is a symlink (its target changes without the
    /// directory changing) or something to report each run is there.
    rememberable: bool,
}

impl Listed {
    fn record(&self, stat: &rustix::fs::Stat, now_ns: i64) -> ListingRecord {
        ListingRecord {
            dev: stat.st_dev,
            ino: stat.st_ino,
            mtime_ns: times_ns(stat).0,
            ctime_ns: times_ns(stat).1,
            seen_ns: now_ns,
            pycache: self.pycache,
            dirs: self.dirs.clone(),
            sources: self.sources.iter().map(|(n, _)| n.clone()).collect(),
        }
    }
}

/// Walks `prefix` through directory descriptors (never following a
/// symlinked directory, skipping `__pycache__`), returning the sources and
/// the paths that could not be read or are not regular files.
///
/// With `known` (the index, and the time now), a directory whose `stat` is
/// the one its listing record was taken with ([`Index::listing`], settled
/// as the stat cache's records are) is neither opened nor listed again: its
/// entries come from the record, and its subdirectories are `stat`ed by
/// path beneath the root. A prefix linked before costs one `stat` per
/// directory.
pub fn walk(prefix: &Path, excludes: &Excludes, known: Option<(&Index, i64)>) -> Walk {
    let opened = tree::open_root(prefix).and_then(|root| {
        // The root listed through a descriptor of its own, held if the
        // budget has room (else opened beneath `root` when visited).
        let first = Held::open(|| tree::open_root(prefix)).transpose()?;
        Ok((root, first))
    });
    let (root, first) = match opened {
        Ok(fds) => fds,
        Err(e) => {
            return Walk {
                found: Vec::new(),
                errors: vec![FileError::new(prefix, Op::Read, e)],
                listed: Vec::new(),
            };
        }
    };
    let at = At {
        prefix,
        excludes,
        known,
        root: Arc::new(root),
    };
    let root = Child {
        path: prefix.to_path_buf(),
        fd: first,
        ask: true,
    };
    Walk::joined(visit(&at, root, 0))
}

/// What every directory of one walk shares.
struct At<'a> {
    prefix: &'a Path,
    excludes: &'a Excludes,
    known: Option<(&'a Index, i64)>,
    root: Arc<OwnedFd>,
}

thread_local! {
    /// The buffer each thread lists directories into.
    /// (Not `vec![MaybeUninit::uninit(); N]`, which writes every byte.)
    static LISTING: std::cell::RefCell<Box<[MaybeUninit<u8>]>> =
        std::cell::RefCell::new(Box::new_uninit_slice(64 * 1024));
}

/// Below this depth (from the prefix), subdirectories are walked in
/// parallel; deeper, one after the other without recursion, so that no
/// depth of tree can exhaust a thread's stack.
const PARALLEL_DEPTH: usize = 8;

/// A subdirectory to walk: its path, its descriptor when open, and whether
/// the index may know it ([`Child::ask`]).
struct Child {
    path: PathBuf,
    fd: Option<Held>,
    /// Whether to look its listing record up. Not below a directory the
    /// index has a record of at that path for another inode (replaced: a
    /// fresh copy where a linked prefix was, a package reinstalled): its
    /// subdirectories are new too, and the index knows none of them. A
    /// directory moved there whole is known again from its next listing.
    /// 3,257 lookups (12,000 instructions each) for a fresh copy of the
    /// reference corpus where it was linked before.
    ///
    /// Only where the replaced directory gets a record of its own this
    /// walk: one that cannot (a source that is a symlink, something to
    /// report) keeps its old record, and the next walks still ask below it.
    ask: bool,
}

/// Walks the directory `path` (through `fd` when open, else by path
/// beneath the root), then its subdirectories: its sources first, then
/// each subdirectory's, in name order (depth first, as a sequential walk
/// finds them). Subtrees above [`PARALLEL_DEPTH`] are walked on every core.
///
/// What each subtree found comes back in pieces, joined by moving list
/// nodes: the sources and listings are copied once, into the walk's result
/// ([`Walk::joined`]), not once more at every level on the way up.
fn visit(at: &At<'_>, dir: Child, depth: usize) -> LinkedList<Walk> {
    let mut walk = Walk {
        found: Vec::new(),
        errors: Vec::new(),
        listed: Vec::new(),
    };
    let subdirs = one_dir(at, dir, &mut walk);
    if depth < PARALLEL_DEPTH {
        let subtrees: Vec<LinkedList<Walk>> = subdirs
            .into_par_iter()
            .map(|child| visit(at, child, depth + 1))
            .collect();
        let mut pieces = LinkedList::from([walk]);
        for mut sub in subtrees {
            pieces.append(&mut sub);
        }
        pieces
    } else {
        let mut pending: Vec<_> = subdirs.into_iter().rev().collect();
        while let Some(child) = pending.pop() {
            let subdirs = one_dir(at, child, &mut walk);
            pending.extend(subdirs.into_iter().rev());
        }
        LinkedList::from([walk])
    }
}

impl Walk {
    /// The pieces of a walk, in order, as one.
    fn joined(pieces: LinkedList<Walk>) -> Walk {
        let mut walk = Walk {
            found: Vec::with_capacity(pieces.iter().map(|w| w.found.len()).sum()),
            errors: Vec::new(),
            listed: Vec::with_capacity(pieces.iter().map(|w| w.listed.len()).sum()),
        };
        for mut piece in pieces {
            walk.found.append(&mut piece.found);
            walk.errors.append(&mut piece.errors);
            walk.listed.append(&mut piece.listed);
        }
        walk
    }
}

/// One directory of a walk: its sources (and what could not be read) added
/// to `walk`, its subdirectories to walk returned, in name order (open
/// when this directory was).
fn one_dir(at: &At<'_>, dir: Child, walk: &mut Walk) -> Vec<Child> {
    let Child { path, fd, ask } = dir;
    let (prefix, excludes, known, root) = (at.prefix, at.excludes, at.known, &at.root);
    let relative = path.strip_prefix(prefix).unwrap_or(&path).to_path_buf();
    let stat = match &fd {
        Some(fd) => rustix::fs::fstat(fd.as_fd()),
        None => {
            // The root itself when its own descriptor found no room.
            let at = if relative.as_os_str().is_empty() {
                Path::new(".")
            } else {
                &relative
            };
            rustix::fs::statat(root.as_fd(), at, AtFlags::SYMLINK_NOFOLLOW)
        }
    };
    let stat = match stat {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => st,
        // Swapped for a symlink or a file, or gone, since its parent was
        // listed: not a directory of this prefix any more.
        Ok(_) | Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Vec::new(),
        Err(e) => {
            walk.errors.push(FileError::new(path, Op::Read, e));
            return Vec::new();
        }
    };
    let (mtime_ns, ctime_ns) = times_ns(&stat);
    let record = known
        .filter(|_| ask)
        .and_then(|(index, _)| index.listing(&path));
    let seen_before = record
        .as_ref()
        .is_some_and(|r| (r.dev, r.ino) == (stat.st_dev, stat.st_ino));
    let replaced = record.is_some() && !seen_before;
    let record = record.filter(|r| {
        (r.dev, r.ino, r.mtime_ns, r.ctime_ns) == (stat.st_dev, stat.st_ino, mtime_ns, ctime_ns)
            && crate::resolve::settled(mtime_ns, ctime_ns, r.seen_ns)
    });
    // The directory as listed: through `fd` (held), or opened by path for
    // the listing alone when the budget had no room (then its children are
    // opened by path too, when visited).
    let mut own = None;
    let (listed, fd, from_record) = match record {
        Some(record) => (
            Listed {
                pycache: record.pycache,
                dirs: record.dirs,
                sources: record.sources.into_iter().map(|n| (n, false)).collect(),
                rememberable: true,
            },
            fd,
            true,
        ),
        None => {
            let fd = match fd {
                Some(fd) => Some(fd),
                None => {
                    // The directory stat'ed by path, not one swapped in
                    // since: its owner decides who may share an inode with
                    // its pycs.
                    let open = || match tree::open_listable_beneath(root.as_fd(), &relative) {
                        Ok(fd) if is_same(fd.as_fd(), (stat.st_dev, stat.st_ino)).is_ok() => Ok(fd),
                        Ok(_) => Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
                        Err(e) => Err(e),
                    };
                    let opened = match Held::open(open) {
                        Some(held) => held.map(Some),
                        None => open().map(|fd| {
                            own = Some(fd);
                            None
                        }),
                    };
                    match opened {
                        Ok(fd) => fd,
                        Err(e) if gone(&e) => return Vec::new(),
                        Err(e) => {
                            walk.errors.push(FileError::new(path, Op::Read, e));
                            return Vec::new();
                        }
                    }
                }
            };
            let listing = fd
                .as_ref()
                .map(AsFd::as_fd)
                .or(own.as_ref().map(AsFd::as_fd))
                .expect("held, or opened for the listing alone");
            let listed = LISTING.with(|buf| {
                list(
                    listing,
                    &path,
                    Some((prefix, excludes)),
                    &mut buf.borrow_mut(),
                )
            });
            let listed = match listed {
                Ok((listed, errors)) => {
                    walk.errors.extend(errors);
                    listed
                }
                Err(e) => {
                    walk.errors.push(FileError::new(path, Op::Read, e));
                    return Vec::new();
                }
            };
            if let (true, Some((_, now_ns))) = (listed.rememberable, known) {
                walk.listed
                    .push((path.clone(), listed.record(&stat, now_ns)));
            }
            (listed, fd, false)
        }
    };
    // Replaced since its record, and recorded anew by this walk: so are its
    // subdirectories, new too.
    let ask = ask && !(replaced && listed.rememberable);
    let mut subdirs = Vec::new();
    for name in listed.dirs {
        let child = joined(&path, &[name.as_bytes()]);
        if excludes.excluded(&child, prefix) {
            continue;
        }
        // Below a directory known from its record, subdirectories are
        // `stat`ed by path and opened only if they changed; below one
        // without a held descriptor, opened by path when visited; and so
        // is any the budget of held descriptors has no room for.
        let parent = match (&fd, &own) {
            (Some(fd), _) if !from_record => Some(fd.as_fd()),
            (None, Some(own)) => Some(own.as_fd()),
            _ => None,
        };
        let fd = match parent.and_then(|parent| Held::open(|| tree::open_dir(parent, &name))) {
            None => None,
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) if gone(&e) => continue,
            Some(Err(e)) => {
                walk.errors.push(FileError::new(child, Op::Read, e));
                continue;
            }
        };
        subdirs.push(Child {
            path: child,
            fd,
            ask,
        });
    }
    let sources: Vec<_> = listed
        .sources
        .into_iter()
        .map(|(name, symlink)| (joined(&path, &[name.as_bytes()]), name, symlink))
        .filter(|(child, _, _)| !excludes.excluded(child, prefix))
        .collect();
    // Only a directory that holds sources is kept (open, if it is).
    if sources.is_empty() {
        return subdirs;
    }
    let (opened, checked) = (OnceLock::new(), OnceLock::new());
    if let Some(fd) = fd {
        // Opened through its parent's descriptor and `fstat`ed above.
        let _ = opened.set(Ok(Some(fd)));
        let _ = checked.set(Ok(()));
    }
    let dir = Arc::new(SourceDir {
        path,
        root: Arc::clone(root),
        relative,
        ino: stat.st_ino,
        sources: sources.len(),
        fd: opened,
        checked,
        dev: stat.st_dev,
        uid: stat.st_uid,
        gid: stat.st_gid,
        listed_pycache: listed.pycache,
        seen_before,
        pycache: OnceLock::new(),
    });
    walk.found
        .extend(sources.into_iter().map(|(path, name, symlink)| Found {
            path,
            dir: Arc::clone(&dir),
            name,
            symlink,
        }));
    subdirs
}

/// A `stat`'s modification and status change times, in nanoseconds.
fn times_ns(stat: &rustix::fs::Stat) -> (i64, i64) {
    (
        stat.st_mtime * 1_000_000_000 + stat.st_mtime_nsec as i64,
        stat.st_ctime * 1_000_000_000 + stat.st_ctime_nsec as i64,
    )
}

/// `Ok` when `fd` is the file `id` (device, inode) names; an error, naming
/// the replacement, when another one took its name since it was found.
fn is_same(fd: BorrowedFd<'_>, id: (u64, u64)) -> std::io::Result<()> {
    let st = rustix::fs::fstat(fd)?;
    if (st.st_dev, st.st_ino) != id {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "replaced while being linked",
        ));
    }
    Ok(())
}

/// Whether opening a directory failed because it is no longer one (swapped
/// for a symlink or a file, or gone) since it was listed.
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT | libc::EXDEV)
    )
}

/// Lists the directory `fd` at `path`: its subdirectories and sources (a
/// `*.py` regular file, or a symlink to one), and the `*.py` names that are
/// neither, to report.
type Listing = (Listed, Vec<FileError>);

fn list(
    fd: BorrowedFd<'_>,
    path: &Path,
    excludes: Option<(&Path, &Excludes)>,
    buf: &mut [MaybeUninit<u8>],
) -> std::io::Result<Listing> {
    let mut entries = read_entries(fd, buf)?;
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut listed = Listed {
        // Only a real directory: a symlink there is refused when a pyc is
        // to be written through it, never looked through.
        pycache: false,
        dirs: Vec::new(),
        sources: Vec::new(),
        rememberable: true,
    };
    let mut errors = Vec::new();
    for (name, mut kind) in entries {
        if kind == FileType::Unknown {
            match rustix::fs::statat(fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => kind = FileType::from_raw_mode(st.st_mode),
                Err(_) => continue,
            }
        }
        if kind == FileType::Directory {
            if name == "__pycache__" {
                listed.pycache = true;
            } else {
                listed.dirs.push(name);
            }
            continue;
        }
        let is_py = name
            .as_bytes()
            .strip_suffix(b".py")
            .is_some_and(|stem| !stem.is_empty());
        if !is_py {
            continue;
        }
        let target = match kind {
            // A symlink counts when it leads to a regular file, as for
            // compileall; a dangling one or a loop is no source.
            FileType::Symlink => {
                listed.rememberable = false;
                match rustix::fs::statat(fd, name.as_os_str(), AtFlags::empty()) {
                    Ok(st) => FileType::from_raw_mode(st.st_mode),
                    Err(_) => continue,
                }
            }
            kind => kind,
        };
        if target != FileType::RegularFile {
            listed.rememberable = false;
            let child = path.join(&name);
            let excluded =
                excludes.is_some_and(|(prefix, excludes)| excludes.excluded(&child, prefix));
            if !excluded {
                errors.push(FileError::new(child, Op::Read, Cause::NotRegular));
            }
            continue;
        }
        listed.sources.push((name, kind == FileType::Symlink));
    }
    Ok((listed, errors))
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
        let Walk { found, errors, .. } = walk(root, &excludes, None);
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

    /// A directory whose `__pycache__` a run just made is not listed for a
    /// record until that change has settled: a record taken sooner would
    /// not be trusted by the next walk (which would list it again).
    #[test]
    fn a_directory_just_changed_is_listed_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.py"), "").unwrap();
        let Walk { found, .. } = walk(dir.path(), &Excludes::new(&[]).unwrap(), None);
        let source_dir = &found[0].dir;
        let made = source_dir.pycache(true).unwrap();
        assert!(made.first && made.made);
        let again = source_dir.pycache(true).unwrap();
        assert!(!again.first && again.made);
        let Some(Relisting::After(after)) = source_dir.listing_after_run(crate::util::now_ns())
        else {
            panic!("a directory changed just now is not to be listed yet")
        };
        let stat = rustix::fs::stat(dir.path()).unwrap();
        let (mtime_ns, ctime_ns) = times_ns(&stat);
        assert_eq!(after, crate::resolve::settles_after(mtime_ns, ctime_ns));
        while crate::util::now_ns() <= after {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let now = crate::util::now_ns();
        match source_dir.listing_after_run(now) {
            Some(Relisting::Record(record)) => {
                assert!(record.pycache);
                assert_eq!(record.sources, [OsString::from("a.py")]);
                assert!(crate::resolve::settled(mtime_ns, ctime_ns, record.seen_ns));
            }
            _ => panic!("a settled directory is listed for its record"),
        }
    }

    /// Writes an empty file at each of `paths` under `root`.
    fn files(root: &Path, paths: &[&str]) {
        for p in paths {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
    }

    /// Walks `root` with `index`, records what it listed (as a link does),
    /// and returns the walk.
    fn walk_and_record(root: &Path, index: &mut Index) -> Walk {
        let walked = walk(
            root,
            &Excludes::new(&[]).unwrap(),
            Some((index, crate::util::now_ns())),
        );
        let mut writes = crate::index::Writes::default();
        for (dir, record) in &walked.listed {
            writes.listing(dir, record);
        }
        index.apply(writes).unwrap();
        walked
    }

    /// Below a directory replaced since its record, the index is not asked:
    /// a record of `deep` (moved in whole, unchanged) that matches its
    /// `stat` but lists no source would hide `d.py` if it were taken.
    #[test]
    fn below_a_replaced_directory_no_listing_record_is_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("app");
        files(&root, &["pkg/a.py", "pkg/sub/b.py", "pkg/sub/deep/d.py"]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut index = Index::open(&tmp.path().join("index")).unwrap();
        walk_and_record(&root, &mut index);

        let old = tmp.path().join("old");
        std::fs::rename(root.join("pkg"), &old).unwrap();
        std::fs::create_dir(root.join("pkg")).unwrap();
        std::fs::rename(old.join("sub"), root.join("pkg/sub")).unwrap();
        files(&root, &["pkg/a.py"]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let deep = root.join("pkg/sub/deep");
        let stat = rustix::fs::stat(&deep).unwrap();
        let (mtime_ns, ctime_ns) = times_ns(&stat);
        let mut writes = crate::index::Writes::default();
        let record = ListingRecord {
            dev: stat.st_dev,
            ino: stat.st_ino,
            mtime_ns,
            ctime_ns,
            seen_ns: crate::util::now_ns(),
            pycache: false,
            dirs: Vec::new(),
            sources: Vec::new(),
        };
        writes.listing(&deep, &record);
        index.apply(writes).unwrap();

        let walked = walk_and_record(&root, &mut index);
        assert!(walked.found.iter().any(|f| f.path == deep.join("d.py")));
        assert!(walked.listed.iter().any(|(dir, _)| dir == &deep));
        assert!(walked.found.iter().all(|f| !f.dir.seen_before));
    }

    /// A replaced directory that gets no record of its own (a source of it
    /// is a symlink) keeps its old one: below it, the index is still asked,
    /// and a subdirectory is known from its record from the next walk on.
    #[test]
    fn below_a_replaced_directory_without_a_record_the_index_is_still_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("app");
        files(&root, &["pkg/a.py", "pkg/sub/b.py"]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut index = Index::open(&tmp.path().join("index")).unwrap();
        walk_and_record(&root, &mut index);

        // Kept aside, so that the new ones cannot have their inodes.
        std::fs::rename(root.join("pkg"), tmp.path().join("old")).unwrap();
        files(&root, &["pkg/a.py", "pkg/sub/b.py"]);
        std::os::unix::fs::symlink("a.py", root.join("pkg/l.py")).unwrap();
        let sub = root.join("pkg/sub");
        for round in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let walked = walk_and_record(&root, &mut index);
            let pkg = walked.found.iter().find(|f| f.dir.path == root.join("pkg"));
            assert!(pkg.is_some_and(|f| !f.dir.seen_before), "walk {round}");
            let listed = walked.listed.iter().any(|(dir, _)| dir == &sub);
            let seen = walked
                .found
                .iter()
                .find(|f| f.dir.path == sub)
                .map(|f| f.dir.seen_before);
            // The first walk lists `sub` (new) and records it; the next
            // take it from that record.
            let expected = if round == 0 {
                (true, Some(false))
            } else {
                (false, Some(true))
            };
            assert_eq!((listed, seen), expected, "walk {round}");
        }
    }
}
