//! Ingestion: the pycs Python writes into the pycache-prefix view. Python
//! writes a temp file and renames it to the pyc's name (or, rarely, writes
//! the pyc's name directly): the view keeps what is written in memory, and
//! on the rename (or the close) checks it against the source and stores
//! it. Only the mount's owner writes, and only names of pycs (and their
//! temp files).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileHandle, INodeNo, Request};

use super::handles::Handle;
use super::nodes::{Key, Node};
use super::{Inner, Kind};
use crate::lock;
use crate::under::Meta;

/// The largest pyc Python may write into the pycache-prefix view.
const MAX_WRITTEN: usize = 256 << 20;

/// A file Python is writing into the pycache-prefix view.
pub(super) struct Written {
    pub dir: PathBuf,
    pub name: OsString,
    pub data: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime: SystemTime,
    /// When it was created: Python read its source before this.
    pub created: SystemTime,
    /// Still reachable by its name (not renamed away or unlinked).
    pub linked: bool,
    /// Who created it.
    pub writer: Writer,
}

/// Who asks for a write: the credentials of the requesting process.
#[derive(Clone, Copy)]
pub(super) struct Writer {
    pub uid: u32,
    gid: u32,
    pid: u32,
}

impl Writer {
    pub fn of(req: &Request) -> Writer {
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

    /// Whether the writer sees the files this server does: the same mount
    /// namespace and root directory. A writer in a container the view is
    /// bind-mounted into compiled its own `/usr/lib/...`, which the view
    /// would check against the host's file of that name.
    fn sees_our_tree(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let same =
            |theirs: String, ours: &str| match (std::fs::metadata(theirs), std::fs::metadata(ours))
            {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            };
        same(format!("/proc/{}/ns/mnt", self.pid), "/proc/self/ns/mnt")
            && same(format!("/proc/{}/root", self.pid), "/proc/self/root")
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

impl Inner {
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

    pub(super) fn create(
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
            created: SystemTime::now(),
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

    pub(super) fn write(
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

    pub(super) fn setattr(
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

    /// Checks and stores what Python wrote as `dir/name` (a file created at
    /// `created`), for `writer`, who must be able to read the source (the
    /// directories on the way were checked by the kernel against the
    /// mirrored ones).
    fn ingest(
        &self,
        writer: &Writer,
        dir: &Path,
        name: &OsStr,
        data: &[u8],
        created: SystemTime,
    ) -> Result<(), Errno> {
        let (stem, interp, optimize) = self
            .pycs
            .parse_any_name(name.as_bytes())
            .ok_or(Errno::EACCES)?;
        let mut file = stem.to_vec();
        file.extend_from_slice(b".py");
        let source = dir.join(OsStr::from_bytes(&file));
        if !writer.sees_our_tree() {
            self.pycs.refuse(
                &self.under,
                &source,
                &format!(
                    "process {} runs in another mount namespace or root directory, so \
                     its source may not be this one",
                    writer.pid
                ),
            );
            return Err(Errno::EACCES);
        }
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
            .ingest(&self.under, &source, interp, optimize, data, created)
    }

    /// A file being written was closed: one written under its final name,
    /// not through a temp file, is checked and stored now.
    pub(super) fn close_written(&self, w: &Mutex<Written>) {
        let (dir, name, data, writer, created) = {
            let w = lock(w);
            if !w.linked {
                return;
            }
            (
                w.dir.clone(),
                w.name.clone(),
                w.data.clone(),
                w.writer,
                w.created,
            )
        };
        if self.pycs.parse_any_name(name.as_bytes()).is_some()
            && self.ingest(&writer, &dir, &name, &data, created).is_ok()
        {
            lock(&self.nodes).written.remove(&(dir, name));
            lock(w).linked = false;
        }
    }

    pub(super) fn rename(
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
        let (data, created) = {
            let w = lock(&w);
            (w.data.clone(), w.created)
        };
        let result = self.ingest(writer, &newdir, newname, &data, created);
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

    pub(super) fn unlink(&self, req_uid: u32, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
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
