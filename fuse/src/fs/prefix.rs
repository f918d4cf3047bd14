//! The pycache-prefix view: the tree `PYTHONPYCACHEPREFIX` points at. Its
//! directories mirror the directories of the whole filesystem (owner and
//! mode included), and `DIR/NAME.TAG.pyc` is the pyc of `/DIR/NAME.py`.
//! What Python writes there is handled by [`super::ingest`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fuser::{Errno, FileType};

use super::handles::Listing;
use super::nodes::{listing_ino, Key, Node};
use super::{is_source, Inner, Resolved};
use crate::lock;

impl Inner {
    /// Looks up `name` in the mirrored directory `dir`: a file being
    /// written, a directory, or the pyc of a source of `dir`. The mount
    /// point itself is hidden.
    pub(super) fn prefix_lookup(
        &self,
        mountpoint: &Path,
        dir: &Path,
        name: &OsStr,
        pid: u32,
    ) -> Result<Resolved, Errno> {
        let rel = dir.join(name);
        if rel == mountpoint {
            return Err(Errno::ENOENT);
        }
        let written = lock(&self.nodes)
            .written
            .get(&(dir.to_path_buf(), name.to_os_string()))
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
        match self.pyc_lookup(dir, dir, name, pid)? {
            Some(found) => Ok(found),
            None => Err(Errno::ENOENT),
        }
    }

    /// Lists the mirrored directory `dir` into `out`: the pycs of its
    /// sources, its directories (not the mount point) and the files being
    /// written there.
    pub(super) fn prefix_list(
        &self,
        mountpoint: &Path,
        dir: &Path,
        out: &mut Listing,
    ) -> Result<(), Errno> {
        let entries = self.under.list(dir)?;
        let mut dirs = Vec::new();
        for e in entries {
            let rel = dir.join(&e.name);
            if let Some(stem) = is_source(e.name.as_bytes(), e.kind) {
                for name in self.pycs.names(stem) {
                    out.push((
                        listing_ino(dir, &name),
                        FileType::RegularFile,
                        OsStr::from_bytes(&name).to_os_string(),
                    ));
                }
                continue;
            }
            let is_dir = match e.kind {
                rustix::fs::FileType::Directory => true,
                rustix::fs::FileType::Symlink => self.under.stat(&rel).is_ok_and(|m| m.is_dir()),
                _ => false,
            };
            if is_dir && rel != mountpoint {
                dirs.push((rel, e.name));
            }
        }
        let mut nodes = lock(&self.nodes);
        for (rel, name) in dirs {
            let (ino, _) = nodes.insert(Key::Path(rel.clone()), false, || Node::Real(rel));
            out.push((ino, FileType::Directory, name));
        }
        for ((wdir, name), ino) in &nodes.written {
            if wdir == dir {
                out.push((*ino, FileType::RegularFile, name.clone()));
            }
        }
        Ok(())
    }
}
