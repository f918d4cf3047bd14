//! Sources as the store sees them: found under a prefix, stat'ed, and known
//! by the blake3 of their bytes, taken from the stat cache when the file is
//! unchanged. Shared by `link`, `status` and the FUSE views.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Cause, FileError, Op};
use crate::index::{Index, StatRecord, Writes};
use crate::interpreter::{self, Interpreter};
use crate::key::SourceDigest;
use crate::pyc::{self, Flavor, HeaderInput};
use crate::tree::DirFd;
use crate::uring::{self, Opened};
use crate::walk::{self, Excludes, Found, SourceDir};
use crate::Result;

/// The default largest source read (`--max-source-size`): far above any real
/// module, far below what a sparse file or a device could make a run read.
pub const MAX_SOURCE_SIZE: u64 = 64 * 1024 * 1024;

/// What a source's `stat` (following a symlinked source) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceStat {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Status change time, seconds and nanoseconds.
    pub ctime: (i64, i64),
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Whether it is a regular file.
    pub regular: bool,
}

impl SourceStat {
    fn of(st: &rustix::fs::Stat) -> SourceStat {
        SourceStat {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime, st.st_ctime_nsec as i64),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            regular: FileType::from_raw_mode(st.st_mode) == FileType::RegularFile,
        }
    }

    /// Modification time in whole seconds (what timestamp pycs record).
    pub fn mtime(&self) -> i64 {
        self.mtime.0
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether every user may read the source: only then may its pyc be
    /// readable by every user, and share an inode with other trees.
    pub fn is_public(&self) -> bool {
        self.mode & 0o444 == 0o444
    }
}

/// A source file: its stat, its digest, and its bytes once read.
pub struct Source {
    /// The path as found under the prefix.
    pub path: PathBuf,
    /// The directory holding it (where its pyc goes).
    pub dir: Arc<SourceDir>,
    /// Its name in that directory.
    pub name: OsString,
    /// `stat` of the file (following a symlink).
    pub meta: SourceStat,
    /// blake3 of its bytes.
    pub digest: SourceDigest,
    limit: u64,
    /// Found as a symlink: read through it (else never).
    symlink: bool,
    bytes: OnceLock<std::result::Result<Arc<Vec<u8>>, FileError>>,
}

/// What became of hashing a found file.
pub enum Hashed {
    /// Hashed (or known from the stat cache).
    Source(Box<Source>),
    /// It vanished or changed while being read: the next run picks it up.
    Skipped,
    /// It could not be read.
    Failed(FileError),
}

impl Source {
    /// Stats and hashes `found`, trusting `index`'s stat cache for unchanged
    /// files; a fresh hash is recorded into `writes` (unless it is `None`).
    /// Only regular files of at most `limit` bytes are read.
    pub fn hash(
        found: &Found,
        index: &Index,
        now_ns: i64,
        writes: Option<&mut Writes>,
        limit: u64,
    ) -> Hashed {
        Self::hash_with(found, |path| index.stat(path), now_ns, writes, limit)
    }

    /// [`Source::hash`], with the stat cache's record of the source from
    /// `cached` (asked only once the source is `stat`ed, and not at all if
    /// it cannot be).
    pub(crate) fn hash_with(
        found: &Found,
        cached: impl FnOnce(&Path) -> Result<Option<StatRecord>>,
        now_ns: i64,
        writes: Option<&mut Writes>,
        limit: u64,
    ) -> Hashed {
        // A source in a directory without `__pycache__` is most likely new
        // to the store: open it at once and take its stat from the open file
        // (no path lookup twice). Elsewhere stat it first: the stat cache
        // usually knows it, and then it is never opened.
        let path = &found.path;
        let (meta, mut opened) = if found.dir.listed_pycache || found.symlink {
            match found.dir.stat_at(found.name.as_os_str(), AtFlags::empty()) {
                Ok(st) => (SourceStat::of(&st), None),
                Err(Errno::NOENT) => return Hashed::Skipped,
                Err(e) => return Hashed::Failed(FileError::new(path, Op::Stat, e)),
            }
        } else {
            let dir = match found.dir.fd() {
                Ok(dir) => dir,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Hashed::Skipped,
                Err(e) => return Hashed::Failed(FileError::new(path, Op::Read, e)),
            };
            // Listed as a regular file: never follow a symlink swapped in
            // since (that one is picked up by the next run).
            match open_source(dir.as_fd(), &found.name, OFlags::NOFOLLOW, path) {
                Ok(Some((fd, st))) => (SourceStat::of(&st), Some(fd)),
                Ok(None) => return Hashed::Skipped,
                Err(e) => return Hashed::Failed(e),
            }
        };
        if let Err(e) = check_kind_and_size(&meta, limit, path) {
            return Hashed::Failed(e);
        }
        let mtime_ns = meta.mtime.0 * 1_000_000_000 + meta.mtime.1;
        let ctime_ns = meta.ctime.0 * 1_000_000_000 + meta.ctime.1;
        let cached = match cached(path) {
            Ok(cached) => cached,
            Err(e) => return Hashed::Failed(FileError::new(path, Op::LookUp, e)),
        };
        let fresh = |r: &StatRecord| {
            r.dev == meta.dev
                && r.ino == meta.ino
                && r.size == meta.size
                && r.mtime_ns == mtime_ns
                && r.ctime_ns == ctime_ns
                && crate::resolve::settled(mtime_ns, ctime_ns, r.seen_ns)
        };
        if let Some(record) = cached.filter(fresh) {
            return Hashed::Source(Box::new(Source {
                path: found.path.clone(),
                dir: Arc::clone(&found.dir),
                name: found.name.clone(),
                meta,
                digest: record.digest,
                limit,
                symlink: found.symlink,
                bytes: OnceLock::new(),
            }));
        }
        let read = match opened.take() {
            Some(fd) => read_open(fd, &meta, limit, path),
            None => read_found(found, &meta, limit),
        };
        Self::from_read(found, meta, read, now_ns, writes, limit)
    }

    /// The source `found`, stat'ed as `meta`, from the result of reading
    /// it: hashed, and its hash recorded into `writes`.
    fn from_read(
        found: &Found,
        meta: SourceStat,
        read: std::result::Result<Option<Vec<u8>>, FileError>,
        now_ns: i64,
        writes: Option<&mut Writes>,
        limit: u64,
    ) -> Hashed {
        let data = match read {
            Ok(Some(data)) => data,
            Ok(None) => return Hashed::Skipped,
            Err(e) => return Hashed::Failed(e),
        };
        let source = Self::of_bytes(found, meta, &data, now_ns, writes, limit);
        let _ = source.bytes.set(Ok(Arc::new(data)));
        Hashed::Source(source)
    }

    /// The source `found`, stat'ed as `meta`, read as `data` (not kept:
    /// [`Source::bytes`] reads it again if asked): hashed, and its hash
    /// recorded into `writes`.
    fn of_bytes(
        found: &Found,
        meta: SourceStat,
        data: &[u8],
        now_ns: i64,
        writes: Option<&mut Writes>,
        limit: u64,
    ) -> Box<Source> {
        let digest = SourceDigest::of(data);
        if let Some(writes) = writes {
            let record = StatRecord {
                dev: meta.dev,
                ino: meta.ino,
                size: meta.size,
                mtime_ns: meta.mtime.0 * 1_000_000_000 + meta.mtime.1,
                ctime_ns: meta.ctime.0 * 1_000_000_000 + meta.ctime.1,
                seen_ns: now_ns,
                digest,
            };
            writes.stat(&found.path, &record);
        }
        Box::new(Source {
            path: found.path.clone(),
            dir: Arc::clone(&found.dir),
            name: found.name.clone(),
            meta,
            digest,
            limit,
            symlink: found.symlink,
            bytes: OnceLock::new(),
        })
    }

    /// Whether `found` is read by [`Source::hash_new`]: a file listed as
    /// regular in a directory new to the index (no `__pycache__`, no
    /// listing record), where the stat cache has nothing to say.
    pub(crate) fn is_new(found: &Found) -> bool {
        !found.symlink && !found.dir.listed_pycache && !found.dir.seen_before
    }

    /// [`Source::hash`] of new files ([`Source::is_new`]), read in batches
    /// through io_uring ([`crate::uring`]): what one-by-one reads would
    /// give, in one syscall a file and two a batch rather than four a file.
    /// `None` when io_uring is not in use: then [`Source::hash`] each.
    pub(crate) fn hash_new(
        found: &[&Found],
        now_ns: i64,
        writes: &mut Writes,
        limit: u64,
    ) -> Option<Vec<Hashed>> {
        if !uring::in_use() {
            return None;
        }
        let mut hashed = Vec::with_capacity(found.len());
        for batch in found.chunks(uring::batch_size()) {
            // Each directory opened once (a batch holds a directory's
            // sources, or several small directories').
            let mut dirs: Vec<(&Arc<SourceDir>, io::Result<DirFd<'_>>)> = Vec::new();
            let mut dir_of = Vec::with_capacity(batch.len());
            for found in batch {
                if !dirs
                    .last()
                    .is_some_and(|(dir, _)| Arc::ptr_eq(dir, &found.dir))
                {
                    dirs.push((&found.dir, found.dir.fd()));
                }
                dir_of.push(dirs.len() - 1);
            }
            // Those whose directory is there to open them from.
            let (items, read): (Vec<_>, Vec<_>) = batch
                .iter()
                .zip(&dir_of)
                .filter_map(|(found, &d)| {
                    let dir = dirs[d].1.as_ref().ok()?.as_fd();
                    Some(((dir, found.name.as_os_str()), *found))
                })
                .unzip();
            let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW;
            // Read only what is regular and not too large; hashed as read
            // (the bytes are not kept: a pyc compiled reads them again).
            let mut whole: Vec<Option<Box<Source>>> = (0..items.len()).map(|_| None).collect();
            let out = if items.is_empty() {
                Some(Vec::new())
            } else {
                uring::open_stat_read(
                    &items,
                    flags,
                    |i, stat| {
                        let meta = SourceStat::of(stat);
                        check_kind_and_size(&meta, limit, &read[i].path)
                            .ok()
                            .map(|()| meta.size)
                    },
                    |i, stat, data| {
                        let meta = SourceStat::of(stat);
                        let source =
                            Self::of_bytes(read[i], meta, data, now_ns, Some(&mut *writes), limit);
                        whole[i] = Some(source);
                    },
                )
            };
            drop(items);
            let Some(out) = out else {
                // The ring broke, with opens relative to these directories
                // perhaps still in flight: their descriptors are never
                // closed (their numbers not reused). What it read is kept;
                // the rest of this batch, and the batches after it, are
                // read one by one.
                let opened: Vec<bool> = dirs.iter().map(|(_, dir)| dir.is_ok()).collect();
                for (_, dir) in dirs {
                    if let Ok(DirFd::Own(fd)) = dir {
                        let _ = fd.into_raw_fd();
                    }
                }
                let mut whole = whole.into_iter();
                for (found, &d) in batch.iter().zip(&dir_of) {
                    let done = opened[d].then(|| whole.next().flatten()).flatten();
                    hashed.push(match done {
                        Some(source) => Hashed::Source(source),
                        None => Self::hash_one_new(found, now_ns, writes, limit),
                    });
                }
                let rest = &found[hashed.len()..];
                hashed.extend(
                    rest.iter()
                        .map(|found| Self::hash_one_new(found, now_ns, writes, limit)),
                );
                return Some(hashed);
            };
            let mut opened = out.into_iter().zip(whole);
            for (found, &d) in batch.iter().zip(&dir_of) {
                let path = &found.path;
                // A directory that could not be opened: tried again, and
                // reported, by the one-by-one path.
                if dirs[d].1.is_err() {
                    hashed.push(Self::hash_one_new(found, now_ns, writes, limit));
                    continue;
                }
                let one = match opened.next() {
                    None | Some((Opened::Again, _)) => {
                        Self::hash_one_new(found, now_ns, writes, limit)
                    }
                    Some((Opened::OpenFailed(Errno::NOENT | Errno::LOOP), _)) => Hashed::Skipped,
                    Some((Opened::OpenFailed(e), _)) => {
                        Hashed::Failed(FileError::new(path, Op::Read, e))
                    }
                    Some((Opened::StatFailed(e), _)) => {
                        Hashed::Failed(FileError::new(path, Op::Stat, e))
                    }
                    Some((Opened::Stated { stat, read }, whole)) => {
                        let meta = SourceStat::of(&stat);
                        match read {
                            None => match check_kind_and_size(&meta, limit, path) {
                                Ok(()) => Hashed::Skipped,
                                Err(e) => Hashed::Failed(e),
                            },
                            Some(uring::Read::Whole) => match whole {
                                Some(source) => Hashed::Source(source),
                                None => Self::hash_one_new(found, now_ns, writes, limit),
                            },
                            Some(uring::Read::Grew) => Hashed::Skipped,
                            Some(uring::Read::Failed(e)) => {
                                Hashed::Failed(FileError::new(path, Op::Read, e))
                            }
                            // Shrunk, cut short or not done: by itself,
                            // opened and stat'ed again.
                            Some(uring::Read::Again) => {
                                Self::hash_one_new(found, now_ns, writes, limit)
                            }
                        }
                    }
                };
                hashed.push(one);
            }
        }
        Some(hashed)
    }

    /// One new file, read by itself (the path [`Source::hash_new`] falls
    /// back to).
    fn hash_one_new(found: &Found, now_ns: i64, writes: &mut Writes, limit: u64) -> Hashed {
        Self::hash_with(found, |_| Ok(None), now_ns, Some(writes), limit)
    }

    /// The source bytes, read at most once and checked against the digest
    /// the keys were made from.
    pub(crate) fn bytes(&self) -> std::result::Result<Arc<Vec<u8>>, FileError> {
        self.bytes
            .get_or_init(|| {
                let path = &self.path;
                let dir = self
                    .dir
                    .fd()
                    .map_err(|e| FileError::new(path, Op::Read, e))?;
                let bytes = read_source(
                    dir.as_fd(),
                    &self.name,
                    self.symlink,
                    &self.meta,
                    self.limit,
                    path,
                )?
                .filter(|bytes| SourceDigest::of(bytes) == self.digest)
                .ok_or_else(|| FileError::new(path, Op::Read, Cause::Changed))?;
                Ok(Arc::new(bytes))
            })
            .clone()
    }

    /// What the header of this source's pyc is made from.
    pub(crate) fn header_input(
        &self,
        interpreter: &Interpreter,
        flavor: Flavor,
    ) -> std::result::Result<HeaderInput, FileError> {
        Ok(match flavor {
            Flavor::Timestamp => HeaderInput::Stat {
                mtime: self.meta.mtime(),
                size: self.meta.size(),
            },
            _ => HeaderInput::Hash(pyc::source_hash(
                interpreter.hash_variant,
                interpreter.magic,
                &self.bytes()?,
            )),
        })
    }

    /// Where `interpreter` looks for this source's pyc at `optimize`.
    pub fn pyc_path(&self, interpreter: &Interpreter, optimize: u8) -> Option<PathBuf> {
        pyc_path(&self.path, interpreter, optimize)
    }
}

/// Refuses what is not a regular file (a FIFO would block the read, a
/// device never ends) and what is larger than `limit`.
fn check_kind_and_size(
    meta: &SourceStat,
    limit: u64,
    path: &Path,
) -> std::result::Result<(), FileError> {
    if !meta.regular {
        return Err(FileError::new(path, Op::Read, Cause::NotRegular));
    }
    if meta.size > limit {
        return Err(too_large(meta.size, limit, path));
    }
    Ok(())
}

fn too_large(size: u64, limit: u64, path: &Path) -> FileError {
    FileError::new(path, Op::Read, Cause::TooLarge { size, limit })
}

/// Opens a source through its directory's descriptor (with `O_NONBLOCK`,
/// so not even the open of a FIFO swapped in can block) and stats it.
/// `None` when it vanished. `path` names it in errors.
fn open_source(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    extra: OFlags,
    path: &Path,
) -> std::result::Result<Option<(OwnedFd, rustix::fs::Stat)>, FileError> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC | extra;
    let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        // A symlink swapped in for a file listed as regular: changed.
        Err(Errno::LOOP) if extra.contains(OFlags::NOFOLLOW) => return Ok(None),
        Err(e) => return Err(FileError::new(path, Op::Read, e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| FileError::new(path, Op::Stat, e))?;
    Ok(Some((fd, st)))
}

/// Reads `found` as stat'ed (`meta`) through its directory's descriptor.
fn read_found(
    found: &Found,
    meta: &SourceStat,
    limit: u64,
) -> std::result::Result<Option<Vec<u8>>, FileError> {
    match found.dir.fd() {
        Ok(dir) => read_source(
            dir.as_fd(),
            &found.name,
            found.symlink,
            meta,
            limit,
            &found.path,
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FileError::new(&found.path, Op::Read, e)),
    }
}

/// Reads a source through its directory's descriptor: only a regular file,
/// the same file that was stat'ed, at most `limit` bytes counted as read,
/// and through a symlink only if it was found as one. `None` when it
/// vanished or changed meanwhile.
fn read_source(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    symlink: bool,
    meta: &SourceStat,
    limit: u64,
    path: &Path,
) -> std::result::Result<Option<Vec<u8>>, FileError> {
    let flags = if symlink {
        OFlags::empty()
    } else {
        OFlags::NOFOLLOW
    };
    let Some((fd, st)) = open_source(dir, name, flags, path)? else {
        return Ok(None);
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(FileError::new(path, Op::Read, Cause::NotRegular));
    }
    if st.st_dev != meta.dev || st.st_ino != meta.ino {
        return Ok(None);
    }
    read_open(fd, meta, limit, path)
}

/// Reads the open regular file `meta` describes: its `size` bytes, in one
/// `read` when the kernel gives them at once (a file does not end before
/// its size unless it shrank, so the end is not read for). A file that
/// turns out longer or shorter changed meanwhile: `None`.
fn read_open(
    fd: OwnedFd,
    meta: &SourceStat,
    limit: u64,
    path: &Path,
) -> std::result::Result<Option<Vec<u8>>, FileError> {
    if meta.size > limit {
        return Err(too_large(meta.size, limit, path));
    }
    let size = meta.size as usize;
    // One byte more than the size: a single read that fills it shows growth.
    // Read into the spare capacity, not zeroed first.
    let mut data = Vec::with_capacity(size + 1);
    while data.len() < size {
        match rustix::io::read(&fd, rustix::buffer::spare_capacity(&mut data)) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(FileError::new(path, Op::Read, e)),
        }
    }
    if data.len() > size {
        return Ok(None);
    }
    Ok(Some(data))
}

/// `DIR/__pycache__/NAME.TAG[.opt-N].pyc` for the source `DIR/NAME.py`.
pub fn pyc_path(source: &Path, interpreter: &Interpreter, optimize: u8) -> Option<PathBuf> {
    let stem = source.file_name()?.as_bytes().strip_suffix(b".py")?;
    // Built from bytes (two `join`s and a `format!` were a twentieth of a
    // re-link's instructions).
    let mut name = Vec::with_capacity(stem.len() + interpreter.cache_tag.len() + 16);
    name.extend_from_slice(stem);
    interpreter.push_pyc_suffix(&mut name, optimize);
    Some(crate::util::joined(
        source.parent()?,
        &[b"__pycache__", &name],
    ))
}

/// What [`Plan::resolve_and_walk`] found: each source with the indexes of its
/// interpreters, and the paths that could not be read, with why.
pub type Walked = (Vec<(Found, Vec<usize>)>, Vec<FileError>);

/// The prefixes to work on, each with the interpreters it is for.
pub struct Plan {
    /// Every interpreter involved, probed once.
    pub interpreters: Vec<Interpreter>,
    /// Absolute prefix paths, each with indexes into `interpreters`.
    pub prefixes: Vec<(PathBuf, Vec<usize>)>,
}

impl Plan {
    /// Resolves each prefix's interpreters (`python` when given, else the
    /// prefix's own; new probes are recorded into `probes`) and walks every
    /// prefix: the sources with their interpreters, and what could not be
    /// read.
    ///
    /// Every prefix is checked and its interpreter found before anything
    /// is walked. Then the interpreters are probed while the prefixes are
    /// walked: a probe that the index does not know yet runs the
    /// interpreter, tens of milliseconds in a store's first run for it (a
    /// fresh CI machine's), which the walk needs not wait for.
    ///
    /// Directories unchanged since `index`'s listing records of them are
    /// not listed again ([`walk::walk`]); with `listings`, what this walk
    /// listed is recorded there.
    pub fn resolve_and_walk(
        prefixes: &[PathBuf],
        python: &[PathBuf],
        excludes: &Excludes,
        index: &Index,
        probes: &mut Writes,
        listings: Option<&mut Writes>,
    ) -> Result<(Plan, Walked)> {
        let mut located = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            check_prefix(prefix)?;
            let prefix = std::path::absolute(prefix)?;
            let executables = if python.is_empty() {
                vec![interpreter::find_in_prefix(&prefix)?]
            } else {
                python.to_vec()
            };
            located.push((prefix, executables));
        }
        let probe = || {
            let mut writes = Writes::default();
            (Self::probe(&located, index, &mut writes), writes)
        };
        let ((resolved, mut probed), walked) = std::thread::scope(|scope| {
            let probing = std::thread::Builder::new()
                .name("pycstore-probe".into())
                .spawn_scoped(scope, probe);
            let walked = walk_prefixes(&located, excludes, index, listings);
            let resolved = match probing {
                Ok(probing) => probing
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                // No thread to be had: probed after the walk instead.
                Err(_) => probe(),
            };
            (resolved, walked)
        });
        probes.append(&mut probed);
        let plan = resolved?;
        let (found, errors) = walked;
        let sources = found
            .into_iter()
            .zip(&plan.prefixes)
            .flat_map(|(found, (_, chosen))| found.into_iter().map(|f| (f, chosen.clone())))
            .collect();
        Ok((plan, (sources, errors)))
    }

    /// Probes (or finds in `index`) every interpreter of `located`, each
    /// once.
    fn probe(
        located: &[(PathBuf, Vec<PathBuf>)],
        index: &Index,
        writes: &mut Writes,
    ) -> Result<Plan> {
        let mut interpreters: Vec<Interpreter> = Vec::new();
        let mut resolved = Vec::with_capacity(located.len());
        for (prefix, executables) in located {
            let mut chosen = Vec::with_capacity(executables.len());
            for exe in executables {
                let i = match interpreters.iter().position(|p| p.executable == *exe) {
                    Some(i) => i,
                    None => {
                        interpreters.push(Interpreter::probe_cached(exe, index, writes)?);
                        interpreters.len() - 1
                    }
                };
                chosen.push(i);
            }
            resolved.push((prefix.clone(), chosen));
        }
        Ok(Plan {
            interpreters,
            prefixes: resolved,
        })
    }
}

/// Walks every prefix of `located`: the sources of each, in order, and
/// what could not be read. With `listings`, what was listed is recorded
/// there.
fn walk_prefixes(
    located: &[(PathBuf, Vec<PathBuf>)],
    excludes: &Excludes,
    index: &Index,
    mut listings: Option<&mut Writes>,
) -> (Vec<Vec<Found>>, Vec<FileError>) {
    let mut sources = Vec::with_capacity(located.len());
    let mut errors = Vec::new();
    let now = crate::util::now_ns();
    for (prefix, _) in located {
        if !prefix.is_dir() {
            errors.push(FileError::new(prefix, Op::Read, Cause::NotADirectory));
            sources.push(Vec::new());
            continue;
        }
        let walked = walk::walk(prefix, excludes, Some((index, now)));
        errors.extend(walked.errors);
        if let Some(writes) = listings.as_deref_mut() {
            for (dir, record) in &walked.listed {
                writes.listing(dir, record);
            }
        }
        sources.push(walked.found);
    }
    (sources, errors)
}

/// Refuses a prefix that is not a directory, before anything is looked for
/// in it: a missing path or a single file is a mistake on the command line,
/// not a file of the prefix that failed.
pub(crate) fn check_prefix(prefix: &Path) -> Result<()> {
    let problem = match std::fs::metadata(prefix) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(meta) if meta.is_file() => {
            let parent = prefix
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            format!(
                "is a file, not a prefix: pycstore links every source of a directory (a venv, \
                 an install, a source tree); pass its directory, `{}`",
                parent.display()
            )
        }
        Ok(_) => "is not a directory: a prefix is a directory of Python sources (a venv, an \
                  install, a source tree)"
            .to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            "does not exist: a prefix is a directory of Python sources (a venv, an install, a \
             source tree)"
                .to_string()
        }
        Err(e) => format!("cannot be read: {e}"),
    };
    Err(crate::Error::NotAPrefix {
        prefix: prefix.to_path_buf(),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    #[test]
    fn pyc_paths_are_where_python_looks() {
        let interpreter = Interpreter {
            executable: PathBuf::from("/usr/bin/python3"),
            implementation: "cpython".into(),
            version: "3.11.7".into(),
            cache_tag: "cpython-311".into(),
            magic: [0xa7, 0x0d, 0x0d, 0x0a],
            hash_variant: pyc::HashVariant::ALL[0],
            prefix: PathBuf::from("/usr"),
            stdlib: PathBuf::from("/usr/lib/python3.11"),
            purelib: PathBuf::from("/usr/lib/python3.11/site-packages"),
            key_domain: None,
        };
        let cases = [
            ("/p/lib/m.py", 0, "/p/lib/__pycache__/m.cpython-311.pyc"),
            (
                "/p/lib/m.py",
                1,
                "/p/lib/__pycache__/m.cpython-311.opt-1.pyc",
            ),
            (
                "/p/lib/a.b.py",
                2,
                "/p/lib/__pycache__/a.b.cpython-311.opt-2.pyc",
            ),
            ("/m.py", 0, "/__pycache__/m.cpython-311.pyc"),
            ("m.py", 0, "__pycache__/m.cpython-311.pyc"),
            ("d/m.py", 0, "d/__pycache__/m.cpython-311.pyc"),
        ];
        for (source, optimize, want) in cases {
            let got = pyc_path(Path::new(source), &interpreter, optimize);
            assert_eq!(
                got.as_deref(),
                Some(Path::new(want)),
                "{source} at {optimize}"
            );
        }
        assert_eq!(pyc_path(Path::new("/p/m.pyw"), &interpreter, 0), None);
    }

    /// A source read and hashed in a batch keeps no bytes: compiling it
    /// reads it again, checked against its digest. A symlink swapped in
    /// for it meanwhile is not even opened through (its target could be a
    /// device whose open does something), and the source counts as
    /// changed.
    #[test]
    fn a_source_read_again_to_compile_is_never_opened_through_a_symlink_swapped_in() {
        if !uring::usable_in_tests() {
            return; // Read one by one, a source keeps its bytes.
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("app");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a.py"), b"A = 1\n").unwrap();
        std::fs::write(root.join("b.py"), b"B = 2\n").unwrap();
        let target = tmp.path().join("target.py");
        std::fs::write(&target, b"B = 2\n").unwrap();
        let walked = walk::walk(&root, &Excludes::new(&[]).unwrap(), None);
        let found: Vec<&Found> = walked.found.iter().collect();
        let mut writes = Writes::default();
        let hashed = Source::hash_new(&found, 0, &mut writes, MAX_SOURCE_SIZE).unwrap();
        let sources: Vec<Box<Source>> = hashed
            .into_iter()
            .map(|h| match h {
                Hashed::Source(source) => source,
                _ => panic!("both sources hashed"),
            })
            .collect();
        assert!(sources.iter().all(|s| s.bytes.get().is_none()));
        assert_eq!(*sources[0].bytes().unwrap(), b"A = 1\n");

        // b.py, now a symlink to a file with its very bytes: watched for
        // any open.
        std::fs::remove_file(root.join("b.py")).unwrap();
        std::os::unix::fs::symlink(&target, root.join("b.py")).unwrap();
        // SAFETY: plain calls on a descriptor owned here.
        let watch = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(watch >= 0);
        let watch = unsafe { OwnedFd::from_raw_fd(watch) };
        let name = std::ffi::CString::new(target.as_os_str().as_bytes()).unwrap();
        let added =
            unsafe { libc::inotify_add_watch(watch.as_raw_fd(), name.as_ptr(), libc::IN_OPEN) };
        assert!(added >= 0);
        let e = sources[1].bytes().expect_err("b.py changed");
        assert!(e.to_string().contains("changed"), "{e}");
        let mut events = [0u8; 256];
        let read = rustix::io::read(&watch, &mut events);
        assert_eq!(read, Err(Errno::AGAIN), "the target was opened");
        // What a read of the symlink would have done, seen by the watch.
        std::fs::read(root.join("b.py")).unwrap();
        assert!(rustix::io::read(&watch, &mut events).is_ok_and(|n| n > 0));
    }
}
