//! The node table: every node the kernel was told about, numbered when
//! first seen and keyed by what it stands for, so one thing keeps one
//! number for as long as the kernel remembers it.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::{Errno, INodeNo};

use super::ingest::Written;
use crate::pycs::{Served, SourceState};
use crate::under::Meta;

/// What a node stands for: the key it is found by again.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    /// A file, directory or symlink of the tree.
    Path(PathBuf),
    /// The overlay's `__pycache__` of the directory at this path.
    Pycache(PathBuf),
    /// A served pyc: its path in the view and the state of its source.
    Pyc(PathBuf, SourceState),
    /// A file being written, by creation number.
    Written(u64),
}

/// A pyc from the store with the stat of its source.
pub(super) struct PycNode {
    pub served: Served,
    pub source: Meta,
    /// The source, relative to the tree's base.
    pub rel: PathBuf,
    /// The permission bits the way to the source left when the pyc was
    /// made ([`Inner::reach_mask`](super::Inner)): its bytes are that
    /// source's, whatever `rel` is later (a symlink to a file others may
    /// not read, replaced by a file they may, must not open the pyc to
    /// them).
    pub reach: u32,
}

#[derive(Clone)]
pub(super) enum Node {
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

pub(super) struct Slot {
    pub node: Node,
    key: Key,
    pub lookups: u64,
}

#[derive(Default)]
pub(super) struct Nodes {
    pub slots: HashMap<u64, Slot>,
    pub by_key: HashMap<Key, u64>,
    /// Files being written, by directory and name.
    pub written: HashMap<(PathBuf, OsString), u64>,
    pub next: u64,
    /// The table's size at which nodes the kernel does not know are swept
    /// ([`Nodes::insert`]).
    sweep_at: usize,
}

/// The root's number.
const ROOT: u64 = 1;

/// The least table size at which unknown nodes are swept.
const SWEEP_AT_LEAST: usize = 1 << 16;

impl Nodes {
    /// A table holding the root (node 1, the tree's base), which the kernel
    /// never forgets.
    pub fn with_root() -> Nodes {
        let mut nodes = Nodes {
            next: ROOT,
            sweep_at: SWEEP_AT_LEAST,
            ..Nodes::default()
        };
        nodes.by_key.insert(Key::Path(PathBuf::new()), ROOT);
        nodes.slots.insert(
            ROOT,
            Slot {
                node: Node::Real(PathBuf::new()),
                key: Key::Path(PathBuf::new()),
                lookups: 1,
            },
        );
        nodes
    }

    pub fn get(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.slots
            .get(&ino.0)
            .map(|s| s.node.clone())
            .ok_or(Errno::ENOENT)
    }

    /// The node for `key`, made by `make` if new; counts a lookup when the
    /// kernel is told about it. A listing makes nodes the kernel is not told
    /// about (their numbers go out as `d_ino`, so that a later lookup gives
    /// the same): once the table doubled since the last sweep, those are
    /// dropped, so that names a tree's writer keeps making up cannot grow
    /// it without end (a name listed again gets a new number).
    pub fn insert(&mut self, key: Key, counted: bool, make: impl FnOnce() -> Node) -> (u64, Node) {
        if let Some(&ino) = self.by_key.get(&key) {
            if let Some(slot) = self.slots.get_mut(&ino) {
                if counted {
                    slot.lookups += 1;
                }
                return (ino, slot.node.clone());
            }
        }
        if self.slots.len() >= self.sweep_at {
            self.sweep();
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

    /// The kernel forgot `n` lookups: a node it no longer knows is dropped
    /// (but the root, and a file being written that still has its name).
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(slot) = self.slots.get_mut(&ino) else {
            return;
        };
        slot.lookups = slot.lookups.saturating_sub(n);
        if slot.lookups == 0 && droppable(ino, slot) {
            if let Some(slot) = self.slots.remove(&ino) {
                if self.by_key.get(&slot.key) == Some(&ino) {
                    self.by_key.remove(&slot.key);
                }
            }
        }
    }

    /// Drops every node the kernel does not know.
    fn sweep(&mut self) {
        self.slots
            .retain(|&ino, slot| slot.lookups > 0 || !droppable(ino, slot));
        let slots = &self.slots;
        self.by_key.retain(|_, ino| slots.contains_key(ino));
        self.sweep_at = (2 * self.slots.len()).max(SWEEP_AT_LEAST);
    }
}

/// Whether a node the kernel does not know may go.
fn droppable(ino: u64, slot: &Slot) -> bool {
    match &slot.node {
        _ if ino == ROOT => false,
        Node::Written(w) => !w.lock().map(|w| w.linked).unwrap_or(false),
        Node::Real(_) | Node::Pycache(_) | Node::Pyc(_) => true,
    }
}

/// A number for a listed name that has no node yet (readdir needs one;
/// the kernel numbers nodes from lookups).
pub(super) fn listing_ino(dir: &Path, name: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    dir.hash(&mut h);
    name.hash(&mut h);
    h.finish() | 1 << 63
}
