//! Lookup: for one source found by the walk, its hash (from the stat cache,
//! or read and hashed), the compile key of each wanted pyc, and what the
//! index holds for it: one [`Target`] per pyc.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Cause, FileError, Op};
use crate::index::{Entry, EntrySlot, Index, LinkRecord, Writes};
use crate::key::CompileKey;
use crate::source::{Hashed, Source};
use crate::walk::Found;
use crate::Result;

use super::Run;

/// What the index said about one wanted pyc.
pub(super) enum Lookup {
    /// The store has this pyc.
    Entry(Entry),
    /// The store has the body in another flavor.
    Body(Entry),
    /// The source does not compile (remembered).
    Rejected(String),
    /// Never compiled.
    Miss,
}

/// One pyc to produce.
pub(super) struct Target {
    pub(super) source: Arc<Source>,
    pub(super) interpreter: usize,
    pub(super) optimize: u8,
    pub(super) key: CompileKey,
    pub(super) pyc: PathBuf,
    pub(super) lookup: Lookup,
    /// What an earlier run recorded of the pyc, for a hit.
    pub(super) recorded: Option<LinkRecord>,
}

impl Run<'_> {
    /// For one source: hash it, look up each of its pycs.
    pub(super) fn look_up(
        &self,
        index: &Index,
        found: &Found,
        chosen: &[usize],
        optimize: &[u8],
    ) -> Vec<Target> {
        let pycs = (chosen.len() * optimize.len()) as u64;
        let mut learned = Writes::default();
        let hashed = Source::hash(
            found,
            index,
            self.now_ns,
            Some(&mut learned),
            self.options.max_source_size,
        );
        self.ledger.learned(&mut learned);
        let source = match hashed {
            Hashed::Source(source) => Arc::<Source>::from(source),
            Hashed::Skipped => {
                self.ledger.skipped(pycs);
                return Vec::new();
            }
            Hashed::Failed(e) => {
                self.ledger.fail(e, None, pycs);
                return Vec::new();
            }
        };
        let mut targets = Vec::with_capacity(pycs as usize);
        for &i in chosen {
            let interpreter = &self.interpreters[i];
            for &optimize in optimize {
                let Some(pyc) = source.pyc_path(interpreter, optimize) else {
                    let e = FileError::new(&source.path, Op::LookUp, Cause::NotAModuleName);
                    self.fail(&source.path, i, e);
                    continue;
                };
                let key = interpreter.compile_key(&source.digest, optimize);
                let mut target = Target {
                    source: Arc::clone(&source),
                    interpreter: i,
                    optimize,
                    key,
                    pyc,
                    lookup: Lookup::Miss,
                    recorded: None,
                };
                match self.lookup(index, &target) {
                    Ok(lookup) => {
                        // Without a `__pycache__` when the walk listed the
                        // directory (a fresh copy), there is no pyc an
                        // earlier run placed to recognise.
                        if matches!(lookup, Lookup::Entry(_)) && found.dir.listed_pycache {
                            target.recorded = index.link_record(&target.pyc);
                        }
                        target.lookup = lookup;
                        targets.push(target);
                    }
                    Err(e) => {
                        let e = FileError::new(&source.path, Op::LookUp, e);
                        self.fail(&source.path, i, e);
                    }
                }
            }
        }
        targets
    }

    fn lookup(&self, index: &Index, target: &Target) -> Result<Lookup> {
        if let Some(entry) = index.entry(&target.key, self.slot(target))? {
            return Ok(Lookup::Entry(entry));
        }
        if let Some(body) = index.entry(&target.key, EntrySlot::Body)? {
            return Ok(Lookup::Body(body));
        }
        if let Some(message) = index.failure(&target.key)? {
            return Ok(Lookup::Rejected(message));
        }
        Ok(Lookup::Miss)
    }
}
