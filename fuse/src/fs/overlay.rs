//! The overlay view: the tree under the base directory, read-only, where
//! every directory holding `.py` files also has a `__pycache__` listing and
//! serving `NAME.TAG[.opt-N].pyc` for the view's interpreters from the
//! store. What a real `__pycache__` underneath holds shows through for
//! other names.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fuser::{Errno, FileType};

use super::attr::kind_of;
use super::handles::Listing;
use super::nodes::{listing_ino, Key, Node};
use super::{is_source, tree_lookup, Inner, Resolved, PYCACHE};
use crate::lock;

impl Inner {
    /// Looks up `name` in the tree's directory `dir`.
    pub(super) fn overlay_lookup(&self, dir: &Path, name: &OsStr) -> Result<Resolved, Errno> {
        if name == PYCACHE {
            let rel = dir.join(PYCACHE);
            let real = self.under.lstat(&rel);
            if real.as_ref().is_ok_and(|m| m.is_dir()) || self.has_sources(dir) {
                let dir = dir.to_path_buf();
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

    /// Looks up `name` in the `__pycache__` of the tree's directory `dir`:
    /// a pyc the view serves, else what the real `__pycache__` holds.
    pub(super) fn overlay_pycache_lookup(
        &self,
        dir: &Path,
        name: &OsStr,
        pid: u32,
    ) -> Result<Resolved, Errno> {
        if let Some(found) = self.pyc_lookup(dir, &dir.join(PYCACHE), name, pid)? {
            return Ok(found);
        }
        let rel = dir.join(PYCACHE).join(name);
        if tree_lookup(self.under.lstat(&rel))?.is_none() {
            return Ok(Resolved::Absent(self.ttl));
        }
        self.entry(Key::Path(rel.clone()), || Node::Real(rel))
    }

    /// Lists the tree's directory `dir` into `out`, with a `__pycache__`
    /// when it holds sources.
    pub(super) fn overlay_list(&self, dir: &Path, out: &mut Listing) -> Result<(), Errno> {
        let entries = self.under.list(dir)?;
        let sources = entries
            .iter()
            .any(|e| is_source(e.name.as_bytes(), e.kind).is_some());
        let mut nodes = lock(&self.nodes);
        let mut pycache = false;
        for e in entries {
            if e.name == PYCACHE && (sources || e.kind == rustix::fs::FileType::Directory) {
                pycache = true;
                let (ino, _) = nodes.insert(Key::Pycache(dir.to_path_buf()), false, || {
                    Node::Pycache(dir.to_path_buf())
                });
                out.push((ino, FileType::Directory, e.name));
                continue;
            }
            let rel = dir.join(&e.name);
            let (ino, _) = nodes.insert(Key::Path(rel.clone()), false, || Node::Real(rel));
            out.push((ino, kind_of(e.kind), e.name));
        }
        if sources && !pycache {
            let (ino, _) = nodes.insert(Key::Pycache(dir.to_path_buf()), false, || {
                Node::Pycache(dir.to_path_buf())
            });
            out.push((ino, FileType::Directory, PYCACHE.into()));
        }
        Ok(())
    }

    /// Lists the `__pycache__` of the tree's directory `dir` into `out`: the
    /// pycs of its sources, then what else the real one holds.
    pub(super) fn overlay_pycache_list(&self, dir: &Path, out: &mut Listing) -> Result<(), Errno> {
        let pyc_dir = dir.join(PYCACHE);
        let mut served = HashSet::new();
        for e in self.under.list(dir)? {
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
                let (ino, _) = nodes.insert(Key::Path(rel.clone()), false, || Node::Real(rel));
                out.push((ino, kind_of(e.kind), e.name));
            }
        }
        Ok(())
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
}
