//! Open files and directories. The overlay opens neither (the first OPEN
//! and OPENDIR answer ENOSYS, so the kernel reads by node and keeps its
//! caches); handles are for the pycache-prefix view's listings and the
//! files Python writes there. A read without a handle finds what to read by
//! its node.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use fuser::{Errno, FileHandle, FileType, FopenFlags, INodeNo, OpenAccMode, OpenFlags};

use super::ingest::Written;
use super::nodes::{Node, PycNode};
use super::Inner;
use crate::lock;

/// A directory listing: node (or listing) number, type and name.
pub(super) type Listing = Vec<(u64, FileType, std::ffi::OsString)>;

/// What a read reads from.
pub(super) enum Handle {
    /// A file of the tree.
    Shared(Arc<std::fs::File>),
    /// A pyc from the store.
    Pyc(Arc<PycNode>),
    /// A directory listing made at open.
    Dir(Arc<Listing>),
    /// A file being written.
    Written(Arc<Mutex<Written>>),
}

impl Inner {
    pub(super) fn add_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, handle);
        FileHandle(fh)
    }

    /// Files are not opened through the view: the first open answers
    /// ENOSYS, so the kernel stops sending OPEN and RELEASE (two round trips
    /// per file Python imports) and reads by inode, keeping the page cache.
    /// Reads then find the file by its node (see [`Inner::node_file`]).
    pub(super) fn open(
        &self,
        ino: INodeNo,
        flags: OpenFlags,
    ) -> Result<(FileHandle, FopenFlags), Errno> {
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

    pub(super) fn read(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
        let handle = match lock(&self.handles).get(&fh.0) {
            Some(Handle::Shared(file)) => Handle::Shared(Arc::clone(file)),
            Some(Handle::Pyc(pyc)) => Handle::Pyc(Arc::clone(pyc)),
            Some(Handle::Written(w)) => Handle::Written(Arc::clone(w)),
            Some(Handle::Dir(_)) => return Err(Errno::EISDIR),
            None if fh.0 == 0 => self.node_file(ino)?,
            None => return Err(Errno::EBADF),
        };
        read_from(&handle, offset, size)
    }

    /// The kernel sends RELEASE without the closing process's credentials:
    /// a pyc written under its final name is checked for its creator.
    pub(super) fn release(&self, fh: FileHandle) -> Result<(), Errno> {
        let handle = lock(&self.handles).remove(&fh.0);
        if let Some(Handle::Written(w)) = handle {
            self.close_written(&w);
        }
        Ok(())
    }

    /// The overlay's directories are not opened through the view: the first
    /// opendir answers ENOSYS, so the kernel stops sending OPENDIR and
    /// RELEASEDIR (two round trips per directory Python lists, in every
    /// process) and keeps the listings it read (they change only when the
    /// tree does). Reads then come without a handle (see
    /// [`Inner::dir_entries`]). The pycache-prefix view's directories change
    /// as Python writes into them, so they are listed afresh on each open.
    pub(super) fn opendir(&self, ino: INodeNo) -> Result<FileHandle, Errno> {
        if self.overlay() {
            lock(&self.nodes).get(ino)?;
            return Err(Errno::ENOSYS);
        }
        let listing = self.listing(ino)?;
        Ok(self.add_handle(Handle::Dir(Arc::new(listing))))
    }

    /// The listing a read of directory `ino` continues from `offset`.
    pub(super) fn dir_entries(
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
    pub(super) fn dir_read(&self, ino: INodeNo, fh: FileHandle) {
        if fh.0 == 0 {
            lock(&self.listings).remove(&ino.0);
        }
    }
}

fn read_from(handle: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
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
