//! The attributes each kind of node shows. Nodes carry the owner and mode
//! of what they stand for (a pyc its source's read bits, a made-up
//! directory its real one's), and the kernel checks every access against
//! them (`default_permissions`), so a reader of the view gets what it could
//! read and list in the tree.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};

use super::ingest::Written;
use super::nodes::{Node, PycNode};
use super::{Inner, PYCACHE};
use crate::lock;
use crate::under::Meta;

impl Inner {
    pub(super) fn attr(&self, ino: u64, node: &Node) -> Result<(Duration, FileAttr), Errno> {
        match node {
            Node::Real(rel) if self.overlay() => {
                Ok((self.ttl, tree_attr(ino, &self.under.lstat(rel)?)))
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
                    made_dir_attr(ino, &meta, perm as u16, meta.uid, meta.gid),
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
                    made_dir_attr(ino, &meta, perm as u16, meta.uid, meta.gid),
                ))
            }
            Node::Pyc(pyc) => Ok((self.ttl, self.pyc_attr(ino, pyc))),
            Node::Written(w) => Ok((self.ttl, self.written_attr(ino, &lock(w)))),
        }
    }

    /// A pyc is never more readable than its source: it has the source's
    /// owner, group and read bits (no write or execute), less what the way
    /// to a symlinked source's target took away when the pyc was made, and
    /// what it takes away now.
    fn pyc_attr(&self, ino: u64, pyc: &PycNode) -> FileAttr {
        let perm = pyc.source.mode & 0o444 & pyc.reach & self.reach_mask(&pyc.rel, &pyc.source);
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

    pub(super) fn written_attr(&self, ino: u64, w: &Written) -> FileAttr {
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

    /// The permission bits a node standing for `rel` (whose stat is `meta`)
    /// may show: all of them, unless `rel` is a symlink, whose target's
    /// attributes the view shows without the directories leading to it.
    pub(super) fn reach_mask(&self, rel: &Path, meta: &Meta) -> u32 {
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
}

fn tree_attr(ino: u64, meta: &Meta) -> FileAttr {
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

/// A directory the view makes up (an overlay `__pycache__`, a directory
/// of the pycache-prefix view), with the times of `meta`.
fn made_dir_attr(ino: u64, meta: &Meta, perm: u16, uid: u32, gid: u32) -> FileAttr {
    FileAttr {
        kind: FileType::Directory,
        perm,
        nlink: 2,
        uid,
        gid,
        size: 4096,
        blocks: 8,
        rdev: 0,
        ..tree_attr(ino, meta)
    }
}

/// The attributes of a negative entry: node 0 tells the kernel the name does
/// not exist, and to remember that for the entry's time to live.
pub(super) fn negative() -> FileAttr {
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

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// The FUSE file type of a file type of the tree.
pub(super) fn kind_of(t: rustix::fs::FileType) -> FileType {
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
