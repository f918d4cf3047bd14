//! The pycs both views serve: a name parsed to a source, an interpreter
//! and an optimize level, resolved by [`crate::pycs::Pycs`]; a node per
//! pyc and source state. A miss is compiled from a thread of its own (see
//! [`Inner::compile`]), so a compile never holds up the threads reading
//! requests from the kernel.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, FileAttr};

use super::nodes::{Key, Node, PycNode};
use super::{Inner, Resolved};
use crate::lock;
use crate::pycs::{Found, Served, Source, SourceState};

/// A miss to compile before the lookup is answered.
pub(super) struct CompileJob {
    pyc: PathBuf,
    source: Source,
    interp: usize,
    optimize: u8,
}

impl Inner {
    /// Looks up `name` in a directory of pycs (`pyc_dir`) whose sources are
    /// in `source_dir`: `None` when the name is not a pyc this view serves
    /// or has no source.
    pub(super) fn pyc_lookup(
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
            Found::Miss if !pycs.fills_misses() || self.is_ours(pid) => Err(Errno::ENOENT),
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
        let reach = self.reach_mask(&rel, &meta);
        self.entry(key, move || {
            Node::Pyc(Arc::new(PycNode {
                served,
                source: meta,
                rel,
                reach,
            }))
        })
    }

    /// Answers a lookup that missed: the pyc looked up again, else compiled.
    pub(super) fn compile(&self, job: CompileJob) -> Result<(Duration, FileAttr), Errno> {
        let served = self
            .pycs
            .lookup_or_compile(&self.under, &job.source, job.interp, job.optimize)?
            .ok_or(Errno::ENOENT)?;
        match self.pyc_entry(job.pyc, &job.source, served)? {
            Resolved::Entry(ttl, attr) => Ok((ttl, attr)),
            Resolved::Absent(_) | Resolved::Compile(_) => Err(Errno::EIO),
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
}
