//! The FUSE filesystem of both views.
//!
//! - Overlay: the tree under the base directory, read-only, where every
//!   directory holding `.py` files also has a `__pycache__` listing and
//!   serving `NAME.TAG[.opt-N].pyc` for the view's interpreters from the
//!   store (what a real `__pycache__` underneath holds shows through for
//!   other names).
//! - Pycache prefix: the tree `PYTHONPYCACHEPREFIX` points at. Its
//!   directories mirror the directories of the whole filesystem, and
//!   `DIR/NAME.TAG.pyc` is the pyc of `/DIR/NAME.py`. Python may write there
//!   (temp file, then rename): what it writes is checked against the source
//!   and stored.
//!
//! Permissions: nodes carry the owner and mode of what they stand for (a
//! pyc its source's read bits, a made-up directory its real one's), and the
//! kernel checks every access against them (`default_permissions`), so a
//! reader of the view gets what it could read and list in the tree.
//!
//! Inodes: the root is 1; every other node is numbered when first seen and
//! keyed by what it stands for. A served pyc is keyed by its path and the
//! state of its source (device, inode, size, mtime, ctime): its size is
//! known at lookup and never changes; a changed source gets a new inode.
//! Callbacks take `&self`, so all state is behind locks; each callback is
//! one match on a helper returning `Result<_, Errno>`, ending in `reply.*`.
//! A lookup that needs a compile is answered from its own thread, so a
//! compile never holds up the threads reading requests from the kernel.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use crate::pycs::{Found, Pycs, Served, Source, SourceState};
use crate::under::{Meta, Under};

/// The largest pyc Python may write into the pycache-prefix view.
const MAX_WRITTEN: usize = 256 << 20;
const PYCACHE: &str = "__pycache__";

/// Which view a filesystem presents.
pub(crate) enum Kind {
    /// The tree itself, with `__pycache__` directories from the store.
    Overlay,
    /// A `PYTHONPYCACHEPREFIX` tree; the base is `/`.
    PycachePrefix {
        /// The mount point relative to `/`, hidden from the view.
        mountpoint: PathBuf,
    },
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Path(PathBuf),
    Pycache(PathBuf),
    Pyc(PathBuf, SourceState),
    Written(u64),
}

/// A pyc from the store with the stat of its source.
struct PycNode {
    served: Served,
    source: Meta,
    /// The source, relative to the tree's base.
    rel: PathBuf,
}

/// A file Python is writing into the pycache-prefix view.
struct Written {
    dir: PathBuf,
    name: OsString,
    data: Vec<u8>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: SystemTime,
    /// Still reachable by its name (not renamed away or unlinked).
    linked: bool,
    /// Who created it.
    writer: Writer,
}

#[derive(Clone)]
enum Node {
    /// A file, directory or symlink of the tree (in the pycache-prefix view,
    /// a directory).
    Real(PathBuf),
    /// The overlay's `__pycache__` of the directory at this path.
    Pycache(PathBuf),
    /// A pyc from the store.
    Pyc(Arc<PycNode>),
    /// A file being written by Python.
    Written(Arc<Mutex<Written>>),
}

struct Slot {
    node: Node,
    key: Key,
    lookups: u64,
}

#[derive(Default)]
struct Nodes {
    slots: HashMap<u64, Slot>,
    by_key: HashMap<Key, u64>,
    /// Files being written, by directory and name.
    written: HashMap<(PathBuf, OsString), u64>,
    next: u64,
}

impl Nodes {
    fn get(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.slots
            .get(&ino.0)
            .map(|s| s.node.clone())
            .ok_or(Errno::ENOENT)
    }

    /// The node for `key`, made by `make` if new; counts a lookup when the
    /// kernel is told about it.
    fn insert(&mut self, key: Key, counted: bool, make: impl FnOnce() -> Node) -> (u64, Node) {
        if let Some(&ino) = self.by_key.get(&key) {
            if let Some(slot) = self.slots.get_mut(&ino) {
                if counted {
                    slot.lookups += 1;
                }
                return (ino, slot.node.clone());
            }
        }
        self.next += 1;
        let ino = self.next;
        let node = make();
        self.by_key.insert(key.clone(), ino);
        self.slots.insert(
            ino,
            Slot {
                node: node.clone(),
                key,
                lookups: u64::from(counted),
            },
        );
        (ino, node)
    }

    /// The kernel forgot `n` lookups: pycs and written files it no longer
    /// knows are dropped (tree nodes stay, so their numbers stay stable).
    fn forget(&mut self, ino: u64, n: u64) {
        let Some(slot) = self.slots.get_mut(&ino) else {
            return;
        };
        slot.lookups = slot.lookups.saturating_sub(n);
        let droppable = match &slot.node {
            Node::Pyc(_) => true,
            Node::Written(w) => !w.lock().map(|w| w.linked).unwrap_or(false),
            Node::Real(_) | Node::Pycache(_) => false,
        };
        if slot.lookups == 0 && droppable {
            if let Some(slot) = self.slots.remove(&ino) {
                if self.by_key.get(&slot.key) == Some(&ino) {
                    self.by_key.remove(&slot.key);
                }
            }
        }
    }
}

/// A directory listing: node (or listing) number, type and name.
type Listing = Vec<(u64, FileType, OsString)>;

enum Handle {
    Shared(Arc<std::fs::File>),
    Pyc(Arc<PycNode>),
    Dir(Arc<Listing>),
    Written(Arc<Mutex<Written>>),
}

/// What a lookup found: an answer, a name that is not there (which the
/// kernel may remember for a while), or a miss to compile first.
enum Resolved {
    Entry(Duration, FileAttr),
    Absent(Duration),
    Compile(CompileJob),
}

/// The attributes of a negative entry: node 0 tells the kernel the name does
/// not exist, and to remember that for the entry's time to live.
fn negative() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// A lookup of a name of the (read-only) tree that is not there.
fn tree_lookup<T>(result: std::io::Result<T>) -> Result<Option<T>, Errno> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Errno::from(e)),
    }
}

/// Who asks for a write: the credentials of the requesting process.
#[derive(Clone, Copy)]
struct Writer {
    uid: u32,
    gid: u32,
    pid: u32,
}

impl Writer {
    fn of(req: &Request) -> Writer {
        Writer {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    /// Whether the writer may read a file of `meta` with permission bits
    /// `perm`, as the kernel decides (its supplementary groups from
    /// `/proc/PID/status`; without them, only its group).
    fn may_read(&self, meta: &Meta, perm: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        if self.uid == meta.uid {
            return perm & 0o400 != 0;
        }
        let in_group = self.gid == meta.gid || self.groups().contains(&meta.gid);
        if in_group {
            return perm & 0o040 != 0;
        }
        perm & 0o004 != 0
    }

    fn groups(&self) -> Vec<u32> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
        status
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

struct CompileJob {
    pyc: PathBuf,
    source: Source,
    interp: usize,
    optimize: u8,
}

struct Inner {
    under: Under,
    pycs: Arc<Pycs>,
    kind: Kind,
    /// How long the kernel may cache entries, attributes and the fact that
    /// a name is not there: changes to the tree, and the pycs of changed
    /// sources, show within this time. Until then Python finds a pyc of an
    /// old source stale by its header and compiles in memory (unless it is
    /// an unchecked-hash pyc), and an object `gc` removed stays open.
    ttl: Duration,
    nodes: Mutex<Nodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Files of the tree read without a handle, by node.
    files: Mutex<HashMap<u64, Arc<std::fs::File>>>,
    /// Overlay listings being read without a handle, by directory node:
    /// made when a read starts at offset 0, dropped when it reaches the end.
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    pid: u32,
}

/// The filesystem of a view.
pub(crate) struct PycFs {
    inner: Arc<Inner>,
    /// Told when the session ends (see [`Filesystem::destroy`] below).
    ended: Option<std::sync::mpsc::Sender<crate::mount::Ended>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn kind_of(t: rustix::fs::FileType) -> FileType {
    use rustix::fs::FileType as T;
    match t {
        T::Directory => FileType::Directory,
        T::Symlink => FileType::Symlink,
        T::Fifo => FileType::NamedPipe,
        T::Socket => FileType::Socket,
        T::CharacterDevice => FileType::CharDevice,
        T::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// A number for a listed name that has no node yet (readdir needs one;
/// the kernel numbers nodes from lookups).
fn listing_ino(dir: &Path, name: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    dir.hash(&mut h);
    name.hash(&mut h);
    h.finish() | 1 << 63
}

fn is_source(name: &[u8], kind: rustix::fs::FileType) -> Option<&[u8]> {
    use rustix::fs::FileType as T;
    let stem = name.strip_suffix(b".py")?;
    (!stem.is_empty() && matches!(kind, T::RegularFile | T::Symlink | T::Unknown)).then_some(stem)
}

impl PycFs {
    pub(crate) fn new(
        under: Under,
        pycs: Arc<Pycs>,
        kind: Kind,
        ttl: Duration,
        ended: std::sync::mpsc::Sender<crate::mount::Ended>,
    ) -> PycFs {
        let mut nodes = Nodes {
            next: 1,
            ..Nodes::default()
        };
        nodes.by_key.insert(Key::Path(PathBuf::new()), 1);
        nodes.slots.insert(
            1,
            Slot {
                node: Node::Real(PathBuf::new()),
                key: Key::Path(PathBuf::new()),
                lookups: 1,
            },
        );
        PycFs {
            inner: Arc::new(Inner {
                under,
                pycs,
                kind,
                ttl,
                nodes: Mutex::new(nodes),
                handles: Mutex::new(HashMap::new()),
                files: Mutex::new(HashMap::new()),
                listings: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                // SAFETY: geteuid and getegid have no preconditions.
                uid: unsafe { libc::geteuid() },
                gid: unsafe { libc::getegid() },
                pid: std::process::id(),
            }),
            ended: Some(ended),
        }
    }
}

impl Inner {
    fn overlay(&self) -> bool {
        matches!(self.kind, Kind::Overlay)
    }

    fn tree_attr(&self, ino: u64, meta: &Meta) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: meta.size,
            blocks: meta.blocks,
            atime: time(meta.atime_ns),
            mtime: time(meta.mtime_ns),
            ctime: time(meta.ctime_ns),
            crtime: time(meta.ctime_ns),
            kind: kind_of(meta.file_type()),
            perm: (meta.mode & 0o7777) as u16,
            nlink: meta.nlink,
            uid: meta.uid,
            gid: meta.gid,
            rdev: meta.rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// A directory the view makes up (an overlay `__pycache__`, a
    /// directory of the pycache-prefix view), with the times of `meta`.
    fn made_dir_attr(&self, ino: u64, meta: &Meta, perm: u16, uid: u32, gid: u32) -> FileAttr {
        FileAttr {
            kind: FileType::Directory,
            perm,
            nlink: 2,
            uid,
            gid,
            size: 4096,
            blocks: 8,
            rdev: 0,
            ..self.tree_attr(ino, meta)
        }
    }

    /// A pyc is never more readable than its source: it has the source's
    /// owner, group and read bits (no write or execute), less what the way
    /// to a symlinked source's target takes away.
    fn pyc_attr(&self, ino: u64, pyc: &PycNode) -> FileAttr {
        let perm = pyc.source.mode & 0o444 & self.reach_mask(&pyc.rel, &pyc.source);
        FileAttr {
            ino: INodeNo(ino),
            size: pyc.served.size,
            blocks: pyc.served.size.div_ceil(512),
            atime: time(pyc.source.mtime_ns),
            mtime: time(pyc.source.mtime_ns),
            ctime: time(pyc.source.ctime_ns),
            crtime: time(pyc.source.ctime_ns),
            kind: FileType::RegularFile,
            perm: perm as u16,
            nlink: 1,
            uid: pyc.source.uid,
            gid: pyc.source.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn written_attr(&self, ino: u64, w: &Written) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: w.data.len() as u64,
            blocks: (w.data.len() as u64).div_ceil(512),
            atime: w.mtime,
            mtime: w.mtime,
            ctime: w.mtime,
            crtime: w.mtime,
            kind: FileType::RegularFile,
            perm: (w.mode & 0o777) as u16,
            nlink: u32::from(w.linked),
            uid: w.uid,
            gid: w.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: u64, node: &Node) -> Result<(Duration, FileAttr), Errno> {
        match node {
            Node::Real(rel) if self.overlay() => {
                Ok((self.ttl, self.tree_attr(ino, &self.under.lstat(rel)?)))
            }
            // The directory it mirrors, owner and mode included: the kernel
            // (`default_permissions`) then hides from each reader what it
            // could not list or search in the tree itself.
            Node::Real(rel) => {
                let meta = self.under.stat(rel)?;
                if !meta.is_dir() {
                    return Err(Errno::ENOENT);
                }
                let perm = meta.mode & 0o7777 & self.reach_mask(rel, &meta);
                Ok((
                    self.ttl,
                    self.made_dir_attr(ino, &meta, perm as u16, meta.uid, meta.gid),
                ))
            }
            // Listed and searched by those who may list and search the
            // directory of its sources (and the real `__pycache__`, whose
            // entries show through); never written.
            Node::Pycache(dir) => {
                let meta = self.under.lstat(dir)?;
                let mut perm = meta.mode & 0o555;
                if let Ok(real) = self.under.lstat(&dir.join(PYCACHE)) {
                    if real.is_dir() {
                        perm &= real.mode;
                    }
                }
                Ok((
                    self.ttl,
                    self.made_dir_attr(ino, &meta, perm as u16, meta.uid, meta.gid),
                ))
            }
            Node::Pyc(pyc) => Ok((self.ttl, self.pyc_attr(ino, pyc))),
            Node::Written(w) => Ok((self.ttl, self.written_attr(ino, &lock(w)))),
        }
    }

    /// Whether a request comes from this process or one it started (a
    /// compile worker): such a request never waits for a compile, or a
    /// worker starting up through the view could wait for itself.
    fn is_ours(&self, pid: u32) -> bool {
        if pid == self.pid {
            return true;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        ppid == Some(self.pid)
    }

    /// The permission bits a node standing for `rel` (whose stat is `meta`)
    /// may show: all of them, unless `rel` is a symlink, whose target's
    /// attributes the view shows without the directories leading to it.
    fn reach_mask(&self, rel: &Path, meta: &Meta) -> u32 {
        match self.under.lstat(rel) {
            Ok(link) if link.file_type() == rustix::fs::FileType::Symlink => {
                self.under.reach_mask(rel, meta).unwrap_or_else(|e| {
                    tracing::debug!(
                        "cannot follow `{}` to its target: {e}",
                        self.under.display_path(rel).display()
                    );
                    0
                })
            }
            Ok(_) => 0o7777,
            Err(_) => 0,
        }
    }

    fn has_sources(&self, dir: &Path) -> bool {
        self.under
            .list(dir)
            .map(|entries| {
                entries
                    .iter()
                    .any(|e| is_source(e.name.as_bytes(), e.kind).is_some())
            })
            .unwrap_or(false)
    }

    fn entry(&self, key: Key, make: impl FnOnce() -> Node) -> Result<Resolved, Errno> {
        let (ino, node) = lock(&self.nodes).insert(key, true, make);
        let (ttl, attr) = self.attr(ino, &node)?;
        Ok(Resolved::Entry(ttl, attr))
    }

    fn lookup(&self, parent: INodeNo, name: &OsStr, pid: u32) -> Result<Resolved, Errno> {
        let parent = lock(&self.nodes).get(parent)?;
        match (&self.kind, parent) {
            (Kind::Overlay, Node::Real(dir)) => {
                if name == PYCACHE {
                    let rel = dir.join(PYCACHE);
                    let real = self.under.lstat(&rel);
                    if real.as_ref().is_ok_and(|m| m.is_dir()) || self.has_sources(&dir) {
                        return self.entry(Key::Pycache(dir.clone()), || Node::Pycache(dir));
                    }
                    real?;
                    return self.entry(Key::Path(rel.clone()), || Node::Real(rel));
                }
                let rel = dir.join(name);
                if tree_lookup(self.under.lstat(&rel))?.is_none() {
                    return Ok(Resolved::Absent(self.ttl));
                }
                self.entry(Key::Path(rel.clone()), || Node::Real(rel))
            }
            (Kind::Overlay, Node::Pycache(dir)) => {
                if let Some(found) = self.pyc_lookup(&dir, &dir.join(PYCACHE), name, pid)? {
                    return Ok(found);
                }
                let rel = dir.join(PYCACHE).join(name);
                if tree_lookup(self.under.lstat(&rel))?.is_none() {
                    return Ok(Resolved::Absent(self.ttl));
                }
                self.entry(Key::Path(rel.clone()), || Node::Real(rel))
            }
            (Kind::PycachePrefix { mountpoint }, Node::Real(dir)) => {
                let rel = dir.join(name);
                if &rel == mountpoint {
                    return Err(Errno::ENOENT);
                }
                let written = lock(&self.nodes)
                    .written
                    .get(&(dir.clone(), name.to_os_string()))
                    .copied();
                if let Some(ino) = written {
                    let mut nodes = lock(&self.nodes);
                    let slot = nodes.slots.get_mut(&ino).ok_or(Errno::ENOENT)?;
                    slot.lookups += 1;
                    let node = slot.node.clone();
                    drop(nodes);
                    let (ttl, attr) = self.attr(ino, &node)?;
                    return Ok(Resolved::Entry(ttl, attr));
                }
                if self.under.stat(&rel).is_ok_and(|m| m.is_dir()) {
                    return self.entry(Key::Path(rel.clone()), || Node::Real(rel));
                }
                match self.pyc_lookup(&dir, &dir, name, pid)? {
                    Some(found) => Ok(found),
                    None => Err(Errno::ENOENT),
                }
            }
            (_, Node::Pyc(_) | Node::Written(_))
            | (Kind::PycachePrefix { .. }, Node::Pycache(_)) => Err(Errno::ENOTDIR),
        }
    }

    /// Looks up `name` in a directory of pycs (`pyc_dir`) whose sources are
    /// in `source_dir`: `None` when the name is not a pyc this view serves
    /// or has no source.
    fn pyc_lookup(
        &self,
        source_dir: &Path,
        pyc_dir: &Path,
        name: &OsStr,
        pid: u32,
    ) -> Result<Option<Resolved>, Errno> {
        let pycs = &self.pycs;
        let Some((stem, interp, optimize)) = pycs.parse_name(name.as_bytes()) else {
            return Ok(None);
        };
        let mut file = stem.to_vec();
        file.extend_from_slice(b".py");
        let source_rel = source_dir.join(OsStr::from_bytes(&file));
        let meta = match self.under.stat(&source_rel) {
            Ok(meta) if meta.is_file() => meta,
            _ => return Ok(None),
        };
        let pyc = pyc_dir.join(name);
        let key = Key::Pyc(pyc.clone(), SourceState::of(&meta));
        let known = {
            let mut nodes = lock(&self.nodes);
            let ino = nodes.by_key.get(&key).copied();
            let known = ino.and_then(|ino| Some((ino, nodes.slots.get(&ino)?.node.clone())));
            match known {
                // `gc` removed its object: readers holding it keep it, new
                // lookups get a new pyc, so the space is freed once the
                // kernel forgets the old one.
                Some((_, Node::Pyc(p))) if !p.served.in_store() => {
                    nodes.by_key.remove(&key);
                    None
                }
                Some((ino, node)) => {
                    if let Some(slot) = nodes.slots.get_mut(&ino) {
                        slot.lookups += 1;
                    }
                    Some((ino, node))
                }
                None => None,
            }
        };
        if let Some((ino, node)) = known {
            let (ttl, attr) = self.attr(ino, &node)?;
            return Ok(Some(Resolved::Entry(ttl, attr)));
        }
        let source = pycs.source(&self.under, &source_rel, meta)?;
        match pycs.find(&source, interp, optimize) {
            Found::Served(served) => Ok(Some(self.pyc_entry(pyc, &source, served)?)),
            Found::Absent => Err(Errno::ENOENT),
            Found::Failed(e) => Err(e),
            Found::Miss if !pycs.compiles() || self.is_ours(pid) => Err(Errno::ENOENT),
            Found::Miss => Ok(Some(Resolved::Compile(CompileJob {
                pyc,
                source,
                interp,
                optimize,
            }))),
        }
    }

    fn pyc_entry(&self, pyc: PathBuf, source: &Source, served: Served) -> Result<Resolved, Errno> {
        let key = Key::Pyc(pyc, SourceState::of(&source.meta));
        let meta = source.meta;
        let rel = source.rel.clone();
        self.entry(key, move || {
            Node::Pyc(Arc::new(PycNode {
                served,
                source: meta,
                rel,
            }))
        })
    }

    fn compile(&self, job: CompileJob) -> Result<(Duration, FileAttr), Errno> {
        let served = self
            .pycs
            .compile_miss(&self.under, &job.source, job.interp, job.optimize)?
            .ok_or(Errno::ENOENT)?;
        match self.pyc_entry(job.pyc, &job.source, served)? {
            Resolved::Entry(ttl, attr) => Ok((ttl, attr)),
            Resolved::Absent(_) | Resolved::Compile(_) => Err(Errno::EIO),
        }
    }

    fn getattr(&self, ino: INodeNo) -> Result<(Duration, FileAttr), Errno> {
        let node = lock(&self.nodes).get(ino)?;
        self.attr(ino.0, &node)
    }

    fn add_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, handle);
        FileHandle(fh)
    }

    /// Files are not opened through the view: the first open answers
    /// ENOSYS, so the kernel stops sending OPEN and RELEASE (two round trips
    /// per file Python imports) and reads by inode, keeping the page cache.
    /// Reads then find the file by its node (see [`Inner::node_file`]).
    fn open(&self, ino: INodeNo, flags: OpenFlags) -> Result<(FileHandle, FopenFlags), Errno> {
        let node = lock(&self.nodes).get(ino)?;
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match node {
            Node::Written(w) => Ok((self.add_handle(Handle::Written(w)), FopenFlags::empty())),
            _ if writing => Err(if self.overlay() {
                Errno::EROFS
            } else {
                Errno::EACCES
            }),
            Node::Real(_) if !self.overlay() => Err(Errno::EISDIR),
            Node::Pycache(_) => Err(Errno::EISDIR),
            Node::Real(_) | Node::Pyc(_) => Err(Errno::ENOSYS),
        }
    }

    /// The open file behind a node, for reads without a handle: a pyc's
    /// object, or the tree's file (opened once and kept until the kernel
    /// forgets the node).
    fn node_file(&self, ino: INodeNo) -> Result<Handle, Errno> {
        let node = lock(&self.nodes).get(ino)?;
        match node {
            Node::Pyc(pyc) => Ok(Handle::Pyc(pyc)),
            Node::Written(w) => Ok(Handle::Written(w)),
            Node::Real(rel) if self.overlay() => {
                if let Some(file) = lock(&self.files).get(&ino.0) {
                    return Ok(Handle::Shared(Arc::clone(file)));
                }
                let file = Arc::new(self.under.open_file(&rel)?);
                lock(&self.files).insert(ino.0, Arc::clone(&file));
                Ok(Handle::Shared(file))
            }
            Node::Real(_) | Node::Pycache(_) => Err(Errno::EISDIR),
        }
    }

    fn read(&self, ino: INodeNo, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let handle = match lock(&self.handles).get(&fh.0) {
            Some(Handle::Shared(file)) => Handle::Shared(Arc::clone(file)),
            Some(Handle::Pyc(pyc)) => Handle::Pyc(Arc::clone(pyc)),
            Some(Handle::Written(w)) => Handle::Written(Arc::clone(w)),
            Some(Handle::Dir(_)) => return Err(Errno::EISDIR),
            None if fh.0 == 0 => self.node_file(ino)?,
            None => return Err(Errno::EBADF),
        };
        self.read_from(&handle, offset, size)
    }

    fn read_from(&self, handle: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        match handle {
            Handle::Shared(file) => {
                let mut buf = vec![0u8; size as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok(buf)
            }
            Handle::Pyc(pyc) => Ok(pyc.served.read(offset, size)?),
            Handle::Written(w) => {
                let w = lock(w);
                let start = (offset as usize).min(w.data.len());
                let end = (start + size as usize).min(w.data.len());
                Ok(w.data[start..end].to_vec())
            }
            Handle::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// The kernel sends RELEASE without the closing process's credentials:
    /// a pyc written under its final name is checked for its creator.
    fn release(&self, fh: FileHandle) -> Result<(), Errno> {
        let handle = lock(&self.handles).remove(&fh.0);
        if let Some(Handle::Written(w)) = handle {
            // A pyc written under its final name, not through a temp file.
            let (dir, name, data, writer) = {
                let w = lock(&w);
                if !w.linked {
                    return Ok(());
                }
                (w.dir.clone(), w.name.clone(), w.data.clone(), w.writer)
            };
            if self.pycs.parse_any_name(name.as_bytes()).is_some()
                && self.ingest(&writer, &dir, &name, &data).is_ok()
            {
                lock(&self.nodes).written.remove(&(dir, name));
                lock(&w).linked = false;
            }
        }
        Ok(())
    }

    fn listing(&self, ino: INodeNo) -> Result<Listing, Errno> {
        let node = lock(&self.nodes).get(ino)?;
        let mut out: Listing = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        match (&self.kind, node) {
            (Kind::Overlay, Node::Real(dir)) => {
                let entries = self.under.list(&dir)?;
                let sources = entries
                    .iter()
                    .any(|e| is_source(e.name.as_bytes(), e.kind).is_some());
                let mut nodes = lock(&self.nodes);
                let mut pycache = false;
                for e in entries {
                    if e.name == PYCACHE && (sources || e.kind == rustix::fs::FileType::Directory) {
                        pycache = true;
                        let (ino, _) = nodes.insert(Key::Pycache(dir.clone()), false, || {
                            Node::Pycache(dir.clone())
                        });
                        out.push((ino, FileType::Directory, e.name));
                        continue;
                    }
                    let rel = dir.join(&e.name);
                    let (ino, _) = nodes.insert(Key::Path(rel.clone()), false, || Node::Real(rel));
                    out.push((ino, kind_of(e.kind), e.name));
                }
                if sources && !pycache {
                    let (ino, _) = nodes.insert(Key::Pycache(dir.clone()), false, || {
                        Node::Pycache(dir.clone())
                    });
                    out.push((ino, FileType::Directory, PYCACHE.into()));
                }
            }
            (Kind::Overlay, Node::Pycache(dir)) => {
                let pyc_dir = dir.join(PYCACHE);
                let mut served = std::collections::HashSet::new();
                for e in self.under.list(&dir)? {
                    if let Some(stem) = is_source(e.name.as_bytes(), e.kind) {
                        for name in self.pycs.names(stem) {
                            out.push((
                                listing_ino(&pyc_dir, &name),
                                FileType::RegularFile,
                                OsStr::from_bytes(&name).to_os_string(),
                            ));
                            served.insert(name);
                        }
                    }
                }
                if let Ok(entries) = self.under.list(&pyc_dir) {
                    let mut nodes = lock(&self.nodes);
                    for e in entries {
                        if served.contains(e.name.as_bytes()) {
                            continue;
                        }
                        let rel = pyc_dir.join(&e.name);
                        let (ino, _) =
                            nodes.insert(Key::Path(rel.clone()), false, || Node::Real(rel));
                        out.push((ino, kind_of(e.kind), e.name));
                    }
                }
            }
            (Kind::PycachePrefix { mountpoint }, Node::Real(dir)) => {
                let entries = self.under.list(&dir)?;
                let mut dirs = Vec::new();
                for e in entries {
                    let rel = dir.join(&e.name);
                    if let Some(stem) = is_source(e.name.as_bytes(), e.kind) {
                        for name in self.pycs.names(stem) {
                            out.push((
                                listing_ino(&dir, &name),
                                FileType::RegularFile,
                                OsStr::from_bytes(&name).to_os_string(),
                            ));
                        }
                        continue;
                    }
                    let is_dir = match e.kind {
                        rustix::fs::FileType::Directory => true,
                        rustix::fs::FileType::Symlink => {
                            self.under.stat(&rel).is_ok_and(|m| m.is_dir())
                        }
                        _ => false,
                    };
                    if is_dir && &rel != mountpoint {
                        dirs.push((rel, e.name));
                    }
                }
                let mut nodes = lock(&self.nodes);
                for (rel, name) in dirs {
                    let (ino, _) = nodes.insert(Key::Path(rel.clone()), false, || Node::Real(rel));
                    out.push((ino, FileType::Directory, name));
                }
                for ((wdir, name), ino) in &nodes.written {
                    if wdir == &dir {
                        out.push((*ino, FileType::RegularFile, name.clone()));
                    }
                }
            }
            _ => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    /// The overlay's directories are not opened through the view: the first
    /// opendir answers ENOSYS, so the kernel stops sending OPENDIR and
    /// RELEASEDIR (two round trips per directory Python lists, in every
    /// process) and keeps the listings it read (they change only when the
    /// tree does). Reads then come without a handle (see
    /// [`Inner::dir_entries`]). The pycache-prefix view's directories change
    /// as Python writes into them, so they are listed afresh on each open.
    fn opendir(&self, ino: INodeNo) -> Result<FileHandle, Errno> {
        if self.overlay() {
            lock(&self.nodes).get(ino)?;
            return Err(Errno::ENOSYS);
        }
        let listing = self.listing(ino)?;
        Ok(self.add_handle(Handle::Dir(Arc::new(listing))))
    }

    /// The listing a read of directory `ino` continues from `offset`.
    fn dir_entries(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
    ) -> Result<Arc<Listing>, Errno> {
        if fh.0 == 0 {
            let kept = match offset {
                0 => None,
                _ => lock(&self.listings).get(&ino.0).cloned(),
            };
            if let Some(listing) = kept {
                return Ok(listing);
            }
            let listing = Arc::new(self.listing(ino)?);
            lock(&self.listings).insert(ino.0, Arc::clone(&listing));
            return Ok(listing);
        }
        match lock(&self.handles).get(&fh.0) {
            Some(Handle::Dir(listing)) => Ok(Arc::clone(listing)),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::EBADF),
        }
    }

    /// A read without a handle reached the end of directory `ino`.
    fn dir_read(&self, ino: INodeNo, fh: FileHandle) {
        if fh.0 == 0 {
            lock(&self.listings).remove(&ino.0);
        }
    }

    fn readlink(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        match lock(&self.nodes).get(ino)? {
            Node::Real(rel) if self.overlay() => Ok(self.under.readlink(&rel)?),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The directory of the pycache-prefix view at `parent`.
    fn writable_dir(&self, parent: INodeNo) -> Result<PathBuf, Errno> {
        match (&self.kind, lock(&self.nodes).get(parent)?) {
            (Kind::PycachePrefix { .. }, Node::Real(dir)) => Ok(dir),
            (Kind::Overlay, _) => Err(Errno::EROFS),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// The pyc name a file being written stands for: its own name, or the
    /// name of Python's temp file (`NAME.TAG.pyc.ID`) without the suffix.
    fn written_target<'n>(&self, name: &'n [u8]) -> Option<&'n [u8]> {
        if self.pycs.parse_any_name(name).is_some() {
            return Some(name);
        }
        let dot = name.iter().rposition(|&c| c == b'.')?;
        let base = &name[..dot];
        self.pycs.parse_any_name(base).map(|_| base)
    }

    fn create(
        &self,
        writer: Writer,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
    ) -> Result<(Duration, FileAttr, FileHandle), Errno> {
        let dir = self.writable_dir(parent)?;
        self.owner_only(writer.uid)?;
        if self.written_target(name.as_bytes()).is_none() {
            return Err(Errno::EACCES);
        }
        let key = (dir.clone(), name.to_os_string());
        let mut nodes = lock(&self.nodes);
        if nodes.written.contains_key(&key) {
            return Err(Errno::EEXIST);
        }
        nodes.next += 1;
        let id = nodes.next;
        let w = Arc::new(Mutex::new(Written {
            dir,
            name: name.to_os_string(),
            data: Vec::new(),
            uid: self.uid,
            gid: self.gid,
            // Only the writer reads a pyc being written (whatever mode
            // Python asks for, from the source's).
            mode: mode & 0o600,
            mtime: SystemTime::now(),
            linked: true,
            writer,
        }));
        let (ino, _) = nodes.insert(Key::Written(id), true, || Node::Written(Arc::clone(&w)));
        nodes.written.insert(key, ino);
        drop(nodes);
        let attr = self.written_attr(ino, &lock(&w));
        let fh = self.add_handle(Handle::Written(w));
        Ok((self.ttl, attr, fh))
    }

    fn write(
        &self,
        req_uid: u32,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, Errno> {
        self.owner_only(req_uid)?;
        let handle = lock(&self.handles).get(&fh.0).map(|h| match h {
            Handle::Written(w) => Some(Arc::clone(w)),
            _ => None,
        });
        let w = match handle {
            Some(Some(w)) => w,
            Some(None) => return Err(Errno::EBADF),
            None => match lock(&self.nodes).get(ino)? {
                Node::Written(w) => w,
                _ if self.overlay() => return Err(Errno::EROFS),
                _ => return Err(Errno::EACCES),
            },
        };
        let mut w = lock(&w);
        let end = offset as usize + data.len();
        if end > MAX_WRITTEN {
            return Err(Errno::EFBIG);
        }
        if w.data.len() < end {
            w.data.resize(end, 0);
        }
        w.data[offset as usize..end].copy_from_slice(data);
        w.mtime = SystemTime::now();
        Ok(data.len() as u32)
    }

    fn setattr(
        &self,
        req_uid: u32,
        ino: INodeNo,
        size: Option<u64>,
    ) -> Result<(Duration, FileAttr), Errno> {
        let node = lock(&self.nodes).get(ino)?;
        match &node {
            Node::Written(w) => {
                self.owner_only(req_uid)?;
                if let Some(size) = size {
                    if size as usize > MAX_WRITTEN {
                        return Err(Errno::EFBIG);
                    }
                    lock(w).data.resize(size as usize, 0);
                }
                self.attr(ino.0, &node)
            }
            _ if self.overlay() => Err(Errno::EROFS),
            _ => Err(Errno::EPERM),
        }
    }

    /// Only the mount's owner writes into the pycache-prefix view (the
    /// kernel's checks against the mirrored directories let others create
    /// where the tree lets them, as in `/tmp`).
    fn owner_only(&self, req_uid: u32) -> Result<(), Errno> {
        if req_uid == self.uid {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    /// Checks and stores what Python wrote as `dir/name`, for `writer`, who
    /// must be able to read the source (the directories on the way were
    /// checked by the kernel against the mirrored ones).
    fn ingest(&self, writer: &Writer, dir: &Path, name: &OsStr, data: &[u8]) -> Result<(), Errno> {
        let (stem, interp, optimize) = self
            .pycs
            .parse_any_name(name.as_bytes())
            .ok_or(Errno::EACCES)?;
        let mut file = stem.to_vec();
        file.extend_from_slice(b".py");
        let source = dir.join(OsStr::from_bytes(&file));
        let meta = self.under.stat(&source)?;
        let perm = meta.mode & self.reach_mask(&source, &meta);
        if !writer.may_read(&meta, perm) {
            self.pycs.refuse(
                &self.under,
                &source,
                &format!("user {} cannot read the source", writer.uid),
            );
            return Err(Errno::EACCES);
        }
        self.pycs
            .ingest(&self.under, &source, interp, optimize, data)
    }

    fn rename(
        &self,
        writer: &Writer,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
    ) -> Result<(), Errno> {
        let dir = self.writable_dir(parent)?;
        let newdir = self.writable_dir(newparent)?;
        self.owner_only(writer.uid)?;
        let key = (dir, name.to_os_string());
        let ino = lock(&self.nodes)
            .written
            .get(&key)
            .copied()
            .ok_or(Errno::EACCES)?;
        let node = lock(&self.nodes).get(INodeNo(ino))?;
        let Node::Written(w) = node else {
            return Err(Errno::EIO);
        };
        if lock(&w).writer.uid != writer.uid {
            return Err(Errno::EACCES);
        }
        let data = lock(&w).data.clone();
        let result = self.ingest(writer, &newdir, newname, &data);
        let mut nodes = lock(&self.nodes);
        nodes.written.remove(&key);
        {
            let mut w = lock(&w);
            w.linked = false;
            w.dir = newdir;
            w.name = newname.to_os_string();
        }
        if nodes.slots.get(&ino).is_some_and(|s| s.lookups == 0) {
            nodes.forget(ino, 0);
        }
        result
    }

    fn unlink(&self, req_uid: u32, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let dir = self.writable_dir(parent)?;
        self.owner_only(req_uid)?;
        let mut nodes = lock(&self.nodes);
        let ino = nodes
            .written
            .remove(&(dir, name.to_os_string()))
            .ok_or(Errno::EACCES)?;
        if let Ok(Node::Written(w)) = nodes.get(INodeNo(ino)) {
            lock(&w).linked = false;
        }
        Ok(())
    }
}

impl Filesystem for PycFs {
    /// The session is over (the mount is gone): tells [`crate::Mount::run`],
    /// then never returns. fuser 0.18.0 unmounts the mount point once more
    /// after this, believing the view still mounted (an inverted check of
    /// its device, fixed upstream by cberner/fuser#703 but not released):
    /// for a view mounted `--over` a prefix that is itself a mount point
    /// (a read-only image, an NFS export), that would unmount the prefix's
    /// own filesystem. So the session's thread stops here, and ends with the
    /// process.
    fn destroy(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(crate::mount::Ended::Destroyed);
            loop {
                std::thread::park();
            }
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            if let Err(unsupported) = config.add_capabilities(flag) {
                tracing::debug!("the kernel does not support {unsupported:?}");
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.inner.pycs.stats.op(0);
        match self.inner.lookup(parent, name, req.pid()) {
            Ok(Resolved::Entry(ttl, attr)) => reply.entry(&ttl, &attr, Generation(0)),
            Ok(Resolved::Absent(ttl)) => reply.entry(&ttl, &negative(), Generation(0)),
            Ok(Resolved::Compile(job)) => {
                let inner = Arc::clone(&self.inner);
                // If no thread can be started, the dropped reply answers EIO.
                let _ = std::thread::Builder::new()
                    .name("pycstore-miss".into())
                    .spawn(move || match inner.compile(job) {
                        Ok((ttl, attr)) => reply.entry(&ttl, &attr, Generation(0)),
                        Err(e) => reply.error(e),
                    });
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.pycs.stats.op(9);
        let gone = {
            let mut nodes = lock(&self.inner.nodes);
            nodes.forget(ino.0, nlookup);
            nodes.slots.get(&ino.0).is_none_or(|s| s.lookups == 0)
        };
        if gone {
            lock(&self.inner.files).remove(&ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.inner.pycs.stats.op(1);
        match self.inner.getattr(ino) {
            Ok((ttl, attr)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.inner.pycs.stats.op(11);
        match self.inner.setattr(req.uid(), ino, size) {
            Ok((ttl, attr)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.inner.pycs.stats.op(7);
        match self.inner.readlink(ino) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.inner.pycs.stats.op(2);
        match self.inner.open(ino, flags) {
            Ok((fh, flags)) => reply.opened(fh, flags),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.inner.pycs.stats.op(3);
        match self.inner.read(ino, fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.inner.pycs.stats.op(11);
        match self.inner.write(req.uid(), ino, fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.inner.pycs.stats.op(11);
        // Nothing is buffered: ENOSYS tells the kernel to stop sending
        // FLUSH on every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.pycs.stats.op(11);
        match self.inner.release(fh) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.inner.pycs.stats.op(4);
        match self.inner.opendir(ino) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.inner.pycs.stats.op(5);
        match self.inner.dir_entries(ino, fh, offset) {
            Ok(entries) => {
                let mut full = false;
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                        full = true;
                        break;
                    }
                }
                if !full {
                    self.inner.dir_read(ino, fh);
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.pycs.stats.op(6);
        match self.inner.release(fh) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.inner.pycs.stats.op(10);
        match self.inner.create(Writer::of(req), parent, name, mode) {
            Ok((ttl, attr, fh)) => {
                reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.pycs.stats.op(11);
        match self
            .inner
            .rename(&Writer::of(req), parent, name, newparent, newname)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// No file of a view is a terminal (Python asks, for every file it opens).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.inner.pycs.stats.op(8);
        reply.error(Errno::ENOSYS);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.inner.pycs.stats.op(11);
        match self.inner.unlink(req.uid(), parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
