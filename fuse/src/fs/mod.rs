//! The FUSE filesystem of both views, one module per part:
//!
//! - [`overlay`]: the tree under the base directory, read-only, where every
//!   directory holding `.py` files also has a `__pycache__` serving the
//!   store's pycs;
//! - [`prefix`]: the tree `PYTHONPYCACHEPREFIX` points at, mirroring the
//!   directories of the whole filesystem, `DIR/NAME.TAG.pyc` the pyc of
//!   `/DIR/NAME.py`;
//! - [`pyc`]: the pycs both serve, looked up in the store or compiled;
//! - [`ingest`]: the pycs Python writes into the pycache-prefix view,
//!   checked and stored;
//! - [`nodes`]: the node table, [`handles`]: open files and listings,
//!   [`attr`]: what each node shows, [`callbacks`]: the kernel's requests.
//!
//! Inodes: the root is 1; every other node is numbered when first seen and
//! keyed by what it stands for. A served pyc is keyed by its path and the
//! state of its source (device, inode, size, mtime, ctime): its size is
//! known at lookup and never changes; a changed source gets a new inode.
//! Callbacks take `&self`, so all state is behind locks; each callback is
//! one match on a helper returning `Result<_, Errno>`, ending in `reply.*`.

mod attr;
mod callbacks;
mod handles;
mod ingest;
mod nodes;
mod overlay;
mod prefix;
mod pyc;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{Errno, FileAttr, FileType, INodeNo};

use self::handles::{Handle, Listing};
use self::nodes::{Key, Node, Nodes};
use self::pyc::CompileJob;
use crate::lock;
use crate::pycs::Pycs;
use crate::under::Under;

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

/// The filesystem of a view.
pub(crate) struct PycFs {
    inner: Arc<Inner>,
    /// Told when the session ends (see `Filesystem::destroy` in
    /// [`callbacks`]).
    ended: Option<std::sync::mpsc::Sender<crate::mount::Ended>>,
}

/// What the callbacks share (with the threads answering lookups that
/// compile).
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
    /// The server's effective user and group (the owner of what Python
    /// writes into the pycache-prefix view).
    uid: u32,
    gid: u32,
    pid: u32,
    /// Lookups waiting for a compile (or a remote) in threads of their
    /// own, at most [`MISSES_AT_ONCE`].
    misses: AtomicUsize,
    /// Whether the log said that misses were turned away.
    warned_misses: AtomicBool,
}

/// The most lookups that wait for a miss at once, each in a thread: past
/// them a lookup of a missing pyc is answered at once that there is none,
/// and Python compiles the source itself. Without a bound, a reader
/// looking up many missing pycs at once (many processes, each with its
/// own lookup in flight) had the server start a thread for each, as root,
/// past the reader's own limits. Only the compile pool's few workers
/// compile; the rest of the threads wait, for a remote or for them.
const MISSES_AT_ONCE: usize = 64;

/// One of the [`MISSES_AT_ONCE`] places, given back when dropped (when the
/// miss is answered, or its thread could not start).
struct MissSlot(Arc<Inner>);

impl Drop for MissSlot {
    fn drop(&mut self) {
        self.0.misses.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a lookup found: an answer, a name that is not there (which the
/// kernel may remember for a while), or a miss to compile first.
enum Resolved {
    Entry(Duration, FileAttr),
    Absent(Duration),
    Compile(CompileJob),
}

impl PycFs {
    pub(crate) fn new(
        under: Under,
        pycs: Arc<Pycs>,
        kind: Kind,
        ttl: Duration,
        ended: std::sync::mpsc::Sender<crate::mount::Ended>,
    ) -> PycFs {
        PycFs {
            inner: Arc::new(Inner {
                under,
                pycs,
                kind,
                ttl,
                nodes: Mutex::new(Nodes::with_root()),
                handles: Mutex::new(HashMap::new()),
                files: Mutex::new(HashMap::new()),
                listings: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                uid: rustix::process::geteuid().as_raw(),
                gid: rustix::process::getegid().as_raw(),
                pid: std::process::id(),
                misses: AtomicUsize::new(0),
                warned_misses: AtomicBool::new(false),
            }),
            ended: Some(ended),
        }
    }
}

impl Inner {
    /// A place for one more miss to wait in a thread, if there is one.
    fn miss_slot(self: &Arc<Self>) -> Option<MissSlot> {
        if self.misses.fetch_add(1, Ordering::AcqRel) < MISSES_AT_ONCE {
            return Some(MissSlot(Arc::clone(self)));
        }
        self.misses.fetch_sub(1, Ordering::AcqRel);
        if !self.warned_misses.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "more than {MISSES_AT_ONCE} lookups wait for pycs to be compiled or fetched: \
                 further missing pycs are reported missing until some are done \
                 (Python compiles their sources itself)"
            );
        }
        None
    }

    fn overlay(&self) -> bool {
        matches!(self.kind, Kind::Overlay)
    }

    /// Tells the kernel about the node for `key` (made by `make` if new).
    fn entry(&self, key: Key, make: impl FnOnce() -> Node) -> Result<Resolved, Errno> {
        let (ino, node) = lock(&self.nodes).insert(key, true, make);
        match self.attr(ino, &node) {
            Ok((ttl, attr)) => Ok(Resolved::Entry(ttl, attr)),
            Err(e) => {
                // The kernel gets an error, so it will never forget this
                // lookup: not counted.
                lock(&self.nodes).forget(ino, 1);
                Err(e)
            }
        }
    }

    fn lookup(&self, parent: INodeNo, name: &OsStr, pid: u32) -> Result<Resolved, Errno> {
        let parent = lock(&self.nodes).get(parent)?;
        match (&self.kind, parent) {
            (Kind::Overlay, Node::Real(dir)) => self.overlay_lookup(&dir, name),
            (Kind::Overlay, Node::Pycache(dir)) => self.overlay_pycache_lookup(&dir, name, pid),
            (Kind::PycachePrefix { mountpoint }, Node::Real(dir)) => {
                self.prefix_lookup(mountpoint, &dir, name, pid)
            }
            (_, Node::Pyc(_) | Node::Written(_))
            | (Kind::PycachePrefix { .. }, Node::Pycache(_)) => Err(Errno::ENOTDIR),
        }
    }

    fn listing(&self, ino: INodeNo) -> Result<Listing, Errno> {
        let node = lock(&self.nodes).get(ino)?;
        let mut out: Listing = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        match (&self.kind, node) {
            (Kind::Overlay, Node::Real(dir)) => self.overlay_list(&dir, &mut out)?,
            (Kind::Overlay, Node::Pycache(dir)) => self.overlay_pycache_list(&dir, &mut out)?,
            (Kind::PycachePrefix { mountpoint }, Node::Real(dir)) => {
                self.prefix_list(mountpoint, &dir, &mut out)?
            }
            _ => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    fn getattr(&self, ino: INodeNo) -> Result<(Duration, FileAttr), Errno> {
        let node = lock(&self.nodes).get(ino)?;
        self.attr(ino.0, &node)
    }

    fn readlink(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        match lock(&self.nodes).get(ino)? {
            Node::Real(rel) if self.overlay() => Ok(self.under.readlink(&rel)?),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The kernel forgot `nlookup` lookups of `ino`: once it knows the node
    /// no more, the tree's file kept open for it is closed, and a listing
    /// left half read is dropped.
    fn forget(&self, ino: INodeNo, nlookup: u64) {
        let gone = {
            let mut nodes = lock(&self.nodes);
            nodes.forget(ino.0, nlookup);
            nodes.slots.get(&ino.0).is_none_or(|s| s.lookups == 0)
        };
        if gone {
            lock(&self.files).remove(&ino.0);
            lock(&self.listings).remove(&ino.0);
        }
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

/// The stem of a source's name (`NAME` of `NAME.py`), when a file of this
/// type could be one.
fn is_source(name: &[u8], kind: rustix::fs::FileType) -> Option<&[u8]> {
    use rustix::fs::FileType as T;
    let stem = name.strip_suffix(b".py")?;
    (!stem.is_empty() && matches!(kind, T::RegularFile | T::Symlink | T::Unknown)).then_some(stem)
}
