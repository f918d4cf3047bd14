//! Recording: the ledger of a run. What it counted (the report's
//! [`LinkStats`], the usage counters of each interpreter), every failure,
//! and the index writes not yet applied, behind one lock; the writes go to
//! the index in batches: every few seconds once the walk's index session is
//! closed, and at the end. A dry run's ledger counts, and writes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{FileError, Op};
use crate::index::{Counters, Entry, EntrySlot, Index, Placed, Writes};
use crate::interpreter::Interpreter;
use crate::key::CompileKey;
use crate::pyc::Flavor;
use crate::util::lock;
use crate::{Result, Store};

use super::{counter_label, Failure, LinkOptions, LinkStats, Progress};

/// How often compile threads hand what they recorded to the index.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// What a run counted, failed and learned.
pub(super) struct Ledger<'a> {
    state: Mutex<State>,
    /// A dry run: nothing is written.
    dry_run: bool,
    /// The flavor of the pycs linked.
    flavor: Flavor,
    /// When the run started, in seconds: the use time of the objects linked.
    now_secs: u64,
    progress: &'a dyn Progress,
}

struct State {
    stats: LinkStats,
    failures: Vec<FileError>,
    /// Index writes not yet applied.
    writes: Writes,
    /// Usage counters per interpreter.
    counters: HashMap<usize, Counters>,
    last_flush: Instant,
    /// While the walk's index session is open, the index is not flushed to.
    session_open: bool,
}

impl<'a> Ledger<'a> {
    /// A ledger starting from `stats`, the walk's `failures` and what the
    /// interpreter probes `learned`.
    pub(super) fn new(
        stats: LinkStats,
        failures: Vec<FileError>,
        learned: Writes,
        options: &LinkOptions,
        now_ns: i64,
        progress: &'a dyn Progress,
    ) -> Ledger<'a> {
        Ledger {
            state: Mutex::new(State {
                stats,
                failures,
                writes: learned,
                counters: HashMap::new(),
                last_flush: Instant::now(),
                session_open: true,
            }),
            dry_run: options.dry_run,
            flavor: options.flavor,
            now_secs: (now_ns / 1_000_000_000) as u64,
            progress,
        }
    }

    /// Counts into the report's counters.
    pub(super) fn count(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut lock(&self.state).stats);
    }

    /// Counts into the usage counters of interpreter `interpreter`.
    pub(super) fn tally(&self, interpreter: usize, f: impl FnOnce(&mut Counters)) {
        f(lock(&self.state).counters.entry(interpreter).or_default());
    }

    /// One pyc settled: counted by `f`, and shown.
    pub(super) fn settled(&self, f: impl FnOnce(&mut LinkStats)) {
        self.count(f);
        self.progress.advance(1);
    }

    /// The `pycs` pycs of a source that changed or vanished meanwhile.
    pub(super) fn skipped(&self, pycs: u64) {
        self.count(|s| s.skipped += pycs);
        self.progress.advance(pycs);
    }

    /// `pycs` pycs failed with `e` (counted for `interpreter`, if one).
    pub(super) fn fail(&self, e: FileError, interpreter: Option<usize>, pycs: u64) {
        {
            let mut state = lock(&self.state);
            state.failures.push(e);
            state.stats.failed += pycs;
            if let Some(i) = interpreter {
                state.counters.entry(i).or_default().failures += pycs;
            }
        }
        self.progress.advance(pycs);
    }

    /// Reports that what this run learned could not be recorded: the pycs
    /// placed are fine, the next run compiles their objects' entries again.
    pub(super) fn index_failed(&self, index: PathBuf, e: crate::Error) {
        lock(&self.state)
            .failures
            .push(FileError::new(index, Op::Record, e));
    }

    /// Adds what hashing a source learned (its stat cache record).
    pub(super) fn learned(&self, writes: &mut Writes) {
        if !self.dry_run {
            lock(&self.state).writes.append(writes);
        }
    }

    /// Remembers that the pyc at `pyc` is the object of `entry` (its very
    /// inode, when `placed` says which), and, with `used`, that the object
    /// was used now.
    /// `trusted`: compiled by an interpreter no other user can change.
    pub(super) fn record_link(
        &self,
        pyc: &Path,
        entry: &Entry,
        trusted: bool,
        placed: Option<Placed<'_>>,
        used: bool,
    ) {
        if self.dry_run {
            return;
        }
        let writes = &mut lock(&self.state).writes;
        writes.link(pyc, entry, self.flavor, trusted, placed);
        if used {
            writes.used(&entry.object, self.now_secs);
        }
    }

    /// Records the entry of a pyc just written, in `slot` (and as the body
    /// of `key` when the body is new).
    pub(super) fn entry(&self, key: &CompileKey, slot: EntrySlot, entry: &Entry, new_body: bool) {
        if self.dry_run {
            return;
        }
        let writes = &mut lock(&self.state).writes;
        writes.entry(key, slot, entry);
        if new_body {
            writes.entry(key, EntrySlot::Body, entry);
        }
    }

    /// Remembers that the source of `key` does not compile, and why.
    pub(super) fn rejected(&self, key: &CompileKey, message: &str) {
        if !self.dry_run {
            lock(&self.state).writes.failure(key, message);
        }
    }

    /// Records a `__pycache__` this run made.
    pub(super) fn created_dir(&self, dir: &Path) {
        if !self.dry_run {
            lock(&self.state).writes.created_dir(dir);
        }
    }

    /// Whether the run has writes for the index already (then its record
    /// session can be opened ahead of [`Ledger::flush`]).
    pub(super) fn pending(&self) -> bool {
        !self.dry_run && !lock(&self.state).writes.is_empty()
    }

    /// The walk's index session is closed: flushes may open the index.
    pub(super) fn session_closed(&self) {
        lock(&self.state).session_open = false;
    }

    /// Flushes when the walk's session is closed and the last flush is
    /// [`FLUSH_EVERY`] ago; `None` when it is not time.
    pub(super) fn flush_due(
        &self,
        store: &Store,
        interpreters: &[Interpreter],
    ) -> Option<Result<()>> {
        let writes = {
            let mut state = lock(&self.state);
            if state.session_open || state.last_flush.elapsed() < FLUSH_EVERY {
                return None;
            }
            state.last_flush = Instant::now();
            state.take(interpreters)
        };
        Some(self.apply(store, writes))
    }

    /// Applies the pending writes and counters in one index session (the
    /// one `opened` ahead, if any), and `also` (what else the run records,
    /// the remotes' counters) in the same session.
    pub(super) fn flush(
        &self,
        store: &Store,
        interpreters: &[Interpreter],
        also: Option<impl FnOnce(&mut Index)>,
        opened: Option<Result<Index>>,
    ) -> Result<()> {
        let writes = lock(&self.state).take(interpreters);
        if self.dry_run || (writes.is_empty() && also.is_none()) {
            return Ok(());
        }
        let t = Instant::now();
        let mut index = match opened {
            Some(opened) => opened?,
            None => store.index()?,
        };
        tracing::debug!("record: opened in {:.4}s", t.elapsed().as_secs_f64());
        if !writes.is_empty() {
            index.apply(writes)?;
        }
        tracing::debug!("record: applied at {:.4}s", t.elapsed().as_secs_f64());
        if let Some(also) = also {
            also(&mut index);
        }
        index.close()?;
        tracing::debug!("record: closed at {:.4}s", t.elapsed().as_secs_f64());
        Ok(())
    }

    fn apply(&self, store: &Store, writes: Writes) -> Result<()> {
        if self.dry_run || writes.is_empty() {
            return Ok(());
        }
        store.record(writes)
    }

    /// The report's counters, and its failures as they are reported.
    pub(super) fn into_report(self) -> (LinkStats, Vec<Failure>) {
        let state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        let failures = state
            .failures
            .into_iter()
            .map(|e| Failure {
                message: e.message().to_string(),
                path: e.path,
            })
            .collect();
        (state.stats, failures)
    }
}

impl State {
    /// The pending writes with the usage counters, leaving none.
    fn take(&mut self, interpreters: &[Interpreter]) -> Writes {
        let mut writes = std::mem::take(&mut self.writes);
        for (i, counters) in self.counters.drain() {
            writes.count(&counter_label(&interpreters[i]), counters);
        }
        writes
    }
}
