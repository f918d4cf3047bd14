//! The kernel's requests: each callback counts its operation, calls one
//! helper of [`Inner`](super::Inner) returning `Result<_, Errno>`, and ends in `reply.*`.
//! Nothing here panics; a lookup that must compile first is answered from a
//! thread of its own.

use std::ffi::OsStr;
use std::time::SystemTime;

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::attr::negative;
use super::ingest::Writer;
use super::{PycFs, Resolved};
use crate::stats::Op;

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
        self.inner.pycs.stats.op(Op::Lookup);
        match self.inner.lookup(parent, name, req.pid()) {
            Ok(Resolved::Entry(ttl, attr)) => reply.entry(&ttl, &attr, Generation(0)),
            Ok(Resolved::Absent(ttl)) => reply.entry(&ttl, &negative(), Generation(0)),
            Ok(Resolved::Compile(job)) => {
                let Some(slot) = self.inner.miss_slot() else {
                    reply.error(Errno::ENOENT);
                    return;
                };
                // If no thread can be started, the dropped reply answers EIO
                // and the dropped slot is given back.
                let _ = std::thread::Builder::new()
                    .name("pycstore-miss".into())
                    .spawn(move || match slot.0.compile(job) {
                        Ok((ttl, attr)) => reply.entry(&ttl, &attr, Generation(0)),
                        Err(e) => reply.error(e),
                    });
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.pycs.stats.op(Op::Forget);
        self.inner.forget(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.inner.pycs.stats.op(Op::Getattr);
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
        self.inner.pycs.stats.op(Op::Other);
        match self.inner.setattr(req.uid(), ino, size) {
            Ok((ttl, attr)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.inner.pycs.stats.op(Op::Readlink);
        match self.inner.readlink(ino) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.inner.pycs.stats.op(Op::Open);
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
        self.inner.pycs.stats.op(Op::Read);
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
        self.inner.pycs.stats.op(Op::Other);
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
        self.inner.pycs.stats.op(Op::Other);
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
        self.inner.pycs.stats.op(Op::Other);
        match self.inner.release(fh) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.inner.pycs.stats.op(Op::Opendir);
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
        self.inner.pycs.stats.op(Op::Readdir);
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
        self.inner.pycs.stats.op(Op::Releasedir);
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
        self.inner.pycs.stats.op(Op::Create);
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
        self.inner.pycs.stats.op(Op::Other);
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
        self.inner.pycs.stats.op(Op::Ioctl);
        reply.error(Errno::ENOSYS);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.inner.pycs.stats.op(Op::Other);
        match self.inner.unlink(req.uid(), parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
