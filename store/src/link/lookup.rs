//! Lookup: for a batch of the sources the walk found (a directory's, part
//! of one, or several small ones), their hashes (from the stat cache, or
//! read and hashed), the compile key of each wanted pyc, and what the index
//! holds for it: one [`Target`] per pyc.

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
    /// The pyc is still the object an earlier run placed for this very
    /// entry key: nothing to do, and no entry to look up.
    Placed,
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
    /// What an earlier run recorded of the pyc, where the walk found a
    /// `__pycache__`.
    pub(super) recorded: Option<LinkRecord>,
}

impl Run<'_> {
    /// For a batch of sources in walk order (a directory's, part of one, or
    /// several small ones): hash each, look up each of its pycs. Their
    /// records are read from the index in batches (the stat cache's, then
    /// the link records, then the entries of the pycs their link records do
    /// not show in place) rather than in a lookup per source and family.
    pub(super) fn look_up(
        &self,
        index: &Index,
        sources: &[(Found, Vec<usize>)],
        optimize: &[u8],
    ) -> Vec<Target> {
        // The stat cache is asked only for sources in a directory an
        // earlier walk listed, or that has a `__pycache__`. A directory new
        // since (a fresh copy, a new install) holds new files, of which it
        // has no record: they are read and hashed either way.
        let asked: Vec<usize> = (0..sources.len())
            .filter(|&i| {
                let dir = &sources[i].0.dir;
                dir.listed_pycache || dir.seen_before
            })
            .collect();
        let mut stats = vec![None; sources.len()];
        let records = index.stats(asked.iter().map(|&i| sources[i].0.path.as_path()));
        for (i, record) in asked.into_iter().zip(records) {
            stats[i] = record;
        }
        // New files are read in batches (through io_uring, where it is in
        // use), the rest one by one.
        let new: Vec<usize> = (0..sources.len())
            .filter(|&i| Source::is_new(&sources[i].0))
            .collect();
        let mut read: Vec<Option<Hashed>> = (0..sources.len()).map(|_| None).collect();
        if !new.is_empty() {
            let found: Vec<&Found> = new.iter().map(|&i| &sources[i].0).collect();
            let mut learned = Writes::default();
            let limit = self.options.max_source_size;
            if let Some(hashed) = Source::hash_new(&found, self.now_ns, &mut learned, limit) {
                for (i, hashed) in new.into_iter().zip(hashed) {
                    read[i] = Some(hashed);
                }
            }
            self.ledger.learned(&mut learned);
        }
        let mut targets = Vec::new();
        for (((found, chosen), cached), read) in sources.iter().zip(&mut stats).zip(read) {
            let pycs = (chosen.len() * optimize.len()) as u64;
            let hashed = read.unwrap_or_else(|| {
                let mut learned = Writes::default();
                let hashed = Source::hash_with(
                    found,
                    |_| Ok(cached.take()),
                    self.now_ns,
                    Some(&mut learned),
                    self.options.max_source_size,
                );
                self.ledger.learned(&mut learned);
                hashed
            });
            let source = match hashed {
                Hashed::Source(source) => Arc::<Source>::from(source),
                Hashed::Skipped => {
                    self.ledger.skipped(pycs);
                    continue;
                }
                Hashed::Failed(e) => {
                    self.ledger.fail(e, None, pycs);
                    continue;
                }
            };
            for &i in chosen {
                let interpreter = &self.interpreters[i];
                for &optimize in optimize {
                    let Some(pyc) = source.pyc_path(interpreter, optimize) else {
                        let e = FileError::new(&source.path, Op::LookUp, Cause::NotAModuleName);
                        self.fail(&source.path, i, e);
                        continue;
                    };
                    targets.push(Target {
                        source: Arc::clone(&source),
                        interpreter: i,
                        optimize,
                        key: interpreter.compile_key(&source.digest, optimize),
                        pyc,
                        lookup: Lookup::Miss,
                        recorded: None,
                    });
                }
            }
        }
        // Without a `__pycache__` when the walk listed the directory (a
        // fresh copy), there is no pyc an earlier run placed to recognise.
        let listed: Vec<usize> = (0..targets.len())
            .filter(|&i| targets[i].source.dir.listed_pycache)
            .collect();
        let records = index.link_records(listed.iter().map(|&i| targets[i].pyc.as_path()));
        for (i, record) in listed.into_iter().zip(records) {
            targets[i].recorded = record;
        }
        // A pyc placed for the very entry key wanted, still that object:
        // done from its record and one `stat`. The rest need their entries.
        for target in &mut targets {
            if self.still_placed_for_key(target) {
                target.lookup = Lookup::Placed;
            }
        }
        let placed = |t: &Target| matches!(t.lookup, Lookup::Placed);
        let wanted: Vec<_> = targets
            .iter()
            .filter(|t| !placed(t))
            .map(|t| (t.key, self.slot(t)))
            .collect();
        let mut entries = index.entries_of(&wanted).into_iter();
        let mut found = Vec::with_capacity(targets.len());
        for mut target in targets {
            if placed(&target) {
                found.push(target);
                continue;
            }
            let lookup = match entries.next().flatten() {
                Some(entry) => Ok(Lookup::Entry(entry)),
                None => self.lookup_other(index, &target),
            };
            match lookup {
                Ok(lookup) => {
                    target.lookup = lookup;
                    found.push(target);
                }
                Err(e) => {
                    let e = FileError::new(&target.source.path, Op::LookUp, e);
                    self.fail(&target.source.path, target.interpreter, e);
                }
            }
        }
        found
    }

    /// What the index holds for a target whose entry it does not have.
    fn lookup_other(&self, index: &Index, target: &Target) -> Result<Lookup> {
        if let Some(body) = index.entry(&target.key, EntrySlot::Body)? {
            return Ok(Lookup::Body(body));
        }
        if let Some(message) = index.failure(&target.key)? {
            return Ok(Lookup::Rejected(message));
        }
        Ok(Lookup::Miss)
    }
}
