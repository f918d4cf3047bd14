//! `link`: put a valid pyc beside every source of one or more prefixes.
//!
//! The RocksDB index lets one process at a time open it, so it is held only
//! while walking, and a long cold compile never blocks another process:
//!
//! 1. walk (one index session): stat each source, take its blake3 from the
//!    stat cache or read and hash it, derive the compile key of every
//!    (interpreter, optimize level) and look it up; place hits at once,
//!    derive other flavors from stored bodies, and send misses to the
//!    compile pool (interpreter processes started on the first miss, so a
//!    warm run starts none);
//! 2. compile (no session): compile threads write each object and place its
//!    pycs; misses of one key compile once;
//! 3. record: what was compiled, placed and counted goes to the index in
//!    batches (every few seconds during long compiles, and at the end).
//!
//! Nothing stops at a bad file: each failure is kept as a
//! `FileError` with its path, reported as a
//! [`Failure`] at the end, and the run finishes the rest.
//!
//! One `Run` is shared by the walk's threads and the compile threads. Its
//! pieces, one file each:
//!
//! - `lookup`: hash a source, derive its compile keys, look them up in
//!   the index: one target per wanted pyc;
//! - `place`: what to do with a target; check the object, the pyc already
//!   there, and place it (or, in a dry run, count what would be done);
//! - `compile`: the compile threads, and the misses in flight and bodies
//!   compiled, behind one lock;
//! - `record`: the ledger of counts, failures, usage counters and index
//!   writes, behind one lock, and its flushes to the index.
//!
//! A thread that holds the compile lock may take the ledger's, never the
//! other way round.

mod compile;
mod lookup;
mod place;
mod record;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::FileError;
use crate::index::{EntrySlot, Index, Writes};
use crate::interpreter::Interpreter;
use crate::key::CompileKey;
use crate::materialize::{LinkMode, Materializer};
use crate::pyc::Flavor;
use crate::resolve;
use crate::source::Plan;
use crate::util::now_ns;
use crate::walk::{Excludes, Found, Relisting, SourceDir};
use crate::{Result, Store};

use compile::{CompileJob, Compiles};
use lookup::Target;
use place::TrustDomain;
use record::Ledger;

/// What `link` should do.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    /// Interpreters to link for; empty: each prefix's own.
    pub python: Vec<PathBuf>,
    /// Optimize levels (0, 1, 2).
    pub optimize: Vec<u8>,
    /// The invalidation mode of the pycs placed.
    pub flavor: Flavor,
    /// How objects are put into prefixes.
    pub link_mode: LinkMode,
    /// Compile processes per interpreter.
    pub jobs: usize,
    /// Exclude patterns: a pattern with a `/` matches the path relative to
    /// the prefix, one without matches any file or directory name.
    pub excludes: Vec<String>,
    /// Report what would happen, write nothing.
    pub dry_run: bool,
    /// Per-file compile timeout.
    pub timeout: Option<Duration>,
    /// The largest source read, in bytes; larger ones are reported and
    /// skipped.
    pub max_source_size: u64,
    /// The remote tier: asked for local misses, given what is compiled.
    pub remotes: Option<Arc<crate::remote::Remotes>>,
}

/// Counters of one `link` run.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LinkStats {
    /// `.py` files found under the prefixes.
    pub sources: u64,
    /// pycs wanted: sources × interpreters × optimize levels.
    pub pycs: u64,
    /// pycs already in place, identical to the store's: left alone.
    pub up_to_date: u64,
    /// pycs placed from objects the store already had.
    pub hits: u64,
    /// pycs compiled by this run (compile misses).
    pub compiled: u64,
    /// pycs in another invalidation mode (timestamp, unchecked-hash) that
    /// were replaced by the mode asked for.
    pub replaced_other_mode: u64,
    /// pycs placed from objects fetched from a remote (local misses).
    pub fetched: u64,
    /// pycs that could not be produced or placed (see the failures).
    pub failed: u64,
    /// Sources that vanished or changed while being linked; the next run
    /// picks them up.
    pub skipped: u64,
    /// Bytes of the pycs placed that share the store's blocks (reflink, hardlink).
    pub bytes_shared: u64,
    /// Bytes of the pycs placed by copying.
    pub bytes_copied: u64,
}

/// One file that failed, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// The source (or directory) concerned.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// The outcome of `link`.
#[derive(Debug, Serialize)]
pub struct LinkReport {
    /// The counters.
    #[serde(flatten)]
    pub stats: LinkStats,
    /// The link modes used (one per destination filesystem).
    pub link_modes: Vec<LinkMode>,
    /// The interpreters linked for.
    pub interpreters: Vec<Interpreter>,
    /// Every failure, in no particular order.
    pub failures: Vec<Failure>,
    /// Wall time in seconds.
    pub elapsed_seconds: f64,
    /// What each remote did in this run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<crate::remote::RemoteReport>,
}

/// Jobs waiting for the compile threads past which a remote link's lookups
/// pause: from a fast remote, they would otherwise run far ahead of the
/// placing, every job holding its source and its fetched pyc, in pages
/// fresh from the kernel. Jobs still waiting for a remote do not count: a
/// slow remote is asked for as much at once as before.
const QUEUED_MAX: usize = 256;

/// The most sources looked up in one batch (and so by one thread): a
/// directory of hundreds (CPython's `Lib/test`) is still spread over every
/// core, and the small directories of a `site-packages` are looked up a few
/// together (one `MultiGet` a family for them all: 3% fewer instructions in
/// a re-link of the reference corpus than a batch per directory).
const LOOKUP_BATCH: usize = 64;

/// Where `link` reports progress and warnings (a progress bar, or nothing).
pub trait Progress: Sync {
    /// The number of pycs the run will consider.
    fn start(&self, _total: u64) {}
    /// `n` more pycs were settled.
    fn advance(&self, _n: u64) {}
    /// A warning for the user.
    fn warn(&self, message: &str) {
        eprintln!("pycstore: warning: {message}");
    }
}

/// The label of an interpreter in the usage counters.
pub fn counter_label(interpreter: &Interpreter) -> String {
    let magic: String = interpreter
        .magic
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{} {magic}", interpreter.cache_tag)
}

/// Links the prefixes. Fatal errors (no interpreter, no index) are errors;
/// everything per file is in the report.
pub fn link(
    store: &Store,
    prefixes: &[PathBuf],
    options: &LinkOptions,
    progress: &dyn Progress,
) -> Result<LinkReport> {
    let started = Instant::now();
    let excludes = Excludes::new(&options.excludes)?;
    let mut optimize = options.optimize.clone();
    optimize.sort_unstable();
    optimize.dedup();

    let warn = |message: String| progress.warn(&message);
    crate::tree::raise_open_file_limit();
    let domain = TrustDomain::of(store);
    let run;
    // The record session, when it was opened ahead (see below).
    let mut record_session = None;
    {
        // Phase 1: one read-only index session for the probes and every
        // lookup; what it learns is written in one session at its end.
        let index = store.index_reader()?;
        let mut learned = Writes::default();
        let mut listings = Writes::default();
        let (plan, (found, errors)) = Plan::resolve_and_walk(
            prefixes,
            &options.python,
            &excludes,
            &index,
            &mut learned,
            (!options.dry_run).then_some(&mut listings),
        )?;
        learned.append(&mut listings);
        tracing::debug!(
            "found {} sources in {:.3}s",
            found.len(),
            started.elapsed().as_secs_f64()
        );
        let total: u64 = found
            .iter()
            .map(|(_, chosen)| (chosen.len() * optimize.len()) as u64)
            .sum();
        progress.start(total);
        // An index without an entries epoch gets one with this run's
        // records (see `Index::entries_epoch`).
        let entries_epoch = index.entries_epoch().unwrap_or_else(|| {
            let epoch = crate::index::new_entries_epoch();
            if !options.dry_run {
                learned.set_entries_epoch(epoch);
            }
            epoch
        });
        let now = now_ns();
        run = Run {
            store,
            options,
            interpreters: plan.interpreters,
            materializer: Materializer::new(&store.objects, options.link_mode, &warn),
            domain,
            ledger: Ledger::new(
                LinkStats {
                    sources: found.len() as u64,
                    pycs: total,
                    ..LinkStats::default()
                },
                errors,
                learned,
                options,
                now,
                progress,
            ),
            compiles: Compiles::default(),
            progress,
            now_ns: now,
            entries_epoch,
            warned_metadata: AtomicBool::new(false),
            warned_foreign: AtomicBool::new(false),
        };
        // Phase 2 runs while the lookups go on: hits are placed at once,
        // misses go to the compile threads, which outlive the session.
        let (tx, rx) = crossbeam_channel::unbounded::<CompileJob>();
        let mut index = Some(index);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..options.jobs.max(1))
                .map(|_| {
                    let rx = rx.clone();
                    let run = &run;
                    scope.spawn(move || run.compile_loop(rx))
                })
                .collect();
            // Kept for its length: the jobs waiting for a compile thread.
            let queued = rx;
            // Remote tier hook: with remotes, misses go to them first, a
            // directory's together (they may come in one bundle), and reach
            // the compile threads with what was fetched, if anything.
            let session = index.as_ref().expect("open until the walk ends");
            match &options.remotes {
                None => {
                    let batches = lookup_batches(&found);
                    let look_up = || {
                        batches.into_par_iter().for_each(|sources| {
                            for target in run.look_up(session, sources, &optimize) {
                                if let Some(job) = run.act_on(target) {
                                    tx.send(job).expect("compile threads outlive the walk");
                                }
                            }
                        })
                    };
                    if options.dry_run {
                        look_up();
                    } else {
                        rayon::join(|| run.make_pycaches(&found), look_up);
                    }
                    drop(tx);
                }
                Some(remotes) => {
                    let (miss_tx, miss_rx) = crossbeam_channel::unbounded();
                    let run = &run;
                    scope.spawn(move || {
                        remotes.fetch_misses(
                            miss_rx,
                            |job| run.remote_key(job),
                            move |mut job: CompileJob, fetched, bundle| {
                                job.fetched = fetched;
                                job.bundle = bundle;
                                let _ = tx.send(job);
                            },
                        )
                    });
                    // Directories are looked up on every core, nearly in
                    // walk order (each thread takes the next), and their
                    // misses gathered in walk order into bundles
                    // ([`crate::remote::Bundler`]).
                    let dirs: Vec<_> = found.chunk_by(same_dir).collect();
                    let (dir_tx, dir_rx) = crossbeam_channel::unbounded();
                    scope.spawn(move || {
                        let mut bundler = crate::remote::Bundler::default();
                        let mut arrived = std::collections::BTreeMap::new();
                        let mut next = 0;
                        for (i, keys, misses) in dir_rx {
                            arrived.insert(i, (keys, misses));
                            while let Some((keys, misses)) = arrived.remove(&next) {
                                next += 1;
                                if let Some(group) = bundler.add(keys, misses) {
                                    let _ = miss_tx.send(group);
                                }
                            }
                        }
                        if let Some(group) = bundler.finish() {
                            let _ = miss_tx.send(group);
                        }
                    });
                    let taken = std::sync::atomic::AtomicUsize::new(0);
                    rayon::broadcast(|_| loop {
                        // A pause while more than QUEUED_MAX fetched jobs
                        // wait for the compile threads; at most 50 ms a
                        // directory, so that compile threads held up never
                        // hold up the lookups for good.
                        let until = Instant::now() + Duration::from_millis(50);
                        while queued.len() > QUEUED_MAX && Instant::now() < until {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        let i = taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(dir) = dirs.get(i) else { break };
                        let mut keys = Vec::new();
                        let mut misses = Vec::new();
                        for target in run.look_up(session, dir, &optimize) {
                            if run.remote_eligible(target.interpreter) {
                                keys.push(target.key);
                            }
                            misses.extend(run.act_on(target));
                        }
                        let _ = dir_tx.send((i, keys, misses));
                    });
                    drop(dir_tx);
                }
            }
            tracing::debug!(
                "walked and looked up in {:.3}s",
                started.elapsed().as_secs_f64()
            );
            // What the walk learned is written with the compile threads'
            // results: by their periodic flush, or at the end.
            drop(index.take());
            run.ledger.session_closed();
            for worker in workers {
                worker.join().expect("compile threads do not panic");
            }
        });
        // Directories whose `__pycache__` this run made changed since the
        // walk listed them: listed again, so the next walk need not.
        // On every core: 842 directories of the corpus, 10 ms in one thread.
        // Meanwhile the record session opens (10 ms), when there is
        // something to record already. Those changed too recently for a
        // listing to be trusted yet (made in the run's last 20 ms: with
        // `Run::make_pycaches`, few, most often none) are
        // listed once the session is open, after waiting for the rest of
        // their 20 ms if that is at most a tenth of the run so far:
        // otherwise the next walk lists them again (and a re-link right
        // after would need a read-write session for their records).
        if !options.dry_run {
            std::thread::scope(|scope| {
                let opening = run.ledger.pending().then(|| scope.spawn(|| store.index()));
                let dirs: Vec<&SourceDir> = found
                    .chunk_by(same_dir)
                    .map(|sources| sources[0].0.dir.as_ref())
                    .collect();
                let mut relisted = Writes::default();
                let mut later = Vec::new();
                let mut until = i64::MIN;
                for (dir, relisting) in relist(dirs) {
                    match relisting {
                        Relisting::Record(record) => relisted.listing(&dir.path, &record),
                        Relisting::After(at) => {
                            later.push(dir);
                            until = until.max(at);
                        }
                    }
                }
                record_session = opening
                    .map(|opening| opening.join().expect("opening the index does not panic"));
                if !later.is_empty() {
                    let wait = until.saturating_sub(now_ns()).max(0);
                    let patience = started.elapsed().as_nanos() as i64 / 10;
                    let waits = wait <= resolve::SETTLE_WAIT_NS.min(patience);
                    if waits {
                        std::thread::sleep(Duration::from_nanos(wait as u64 + 1));
                    }
                    tracing::debug!(
                        "{} directories changed too recently; listed again {}",
                        later.len(),
                        if waits {
                            format!("{:.1} ms later", wait as f64 / 1e6)
                        } else {
                            format!("without waiting {:.1} ms", wait as f64 / 1e6)
                        }
                    );
                    for (dir, relisting) in relist(later) {
                        if let Relisting::Record(record) = relisting {
                            relisted.listing(&dir.path, &record);
                        }
                    }
                }
                run.ledger.learned(&mut relisted);
            });
        }
    }

    // Phase 3: record.
    tracing::debug!("compiled at {:.3}s", started.elapsed().as_secs_f64());
    if let Some(remotes) = &options.remotes {
        remotes.finish();
        run.remote_warnings();
    }
    // The remotes' counters go in the session of the run's records.
    let record_remotes = options
        .remotes
        .as_ref()
        .filter(|remotes| !options.dry_run && remotes.unrecorded())
        .map(|remotes| {
            |index: &mut Index| {
                if let Err(e) = remotes.record(index) {
                    tracing::debug!("cannot record the remotes' counters: {e}");
                }
            }
        });
    if let Err(e) = run
        .ledger
        .flush(store, &run.interpreters, record_remotes, record_session)
    {
        run.ledger.index_failed(store.index_path(), e);
    }
    tracing::debug!("recorded at {:.3}s", started.elapsed().as_secs_f64());
    let Run {
        materializer,
        ledger,
        interpreters,
        ..
    } = run;
    let (stats, failures) = ledger.into_report();
    Ok(LinkReport {
        stats,
        link_modes: materializer.modes_used(),
        interpreters,
        failures,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        remotes: options
            .remotes
            .as_ref()
            .map(|r| r.report())
            .unwrap_or_default(),
    })
}

/// The sources in batches of at most [`LOOKUP_BATCH`], in walk order: a
/// directory's sources in as few batches as fit, and small directories
/// next to each other together (each batch is one `MultiGet` a family).
fn lookup_batches(found: &[(Found, Vec<usize>)]) -> Vec<&[(Found, Vec<usize>)]> {
    let mut batches = Vec::new();
    let (mut start, mut end) = (0, 0);
    for dir in found.chunk_by(same_dir) {
        for chunk in dir.chunks(LOOKUP_BATCH) {
            if end > start && end - start + chunk.len() > LOOKUP_BATCH {
                batches.push(&found[start..end]);
                start = end;
            }
            end += chunk.len();
        }
    }
    if end > start {
        batches.push(&found[start..end]);
    }
    batches
}

/// Whether two sources the walk found are in one directory (the walk finds
/// a directory's sources one after the other).
fn same_dir(a: &(Found, Vec<usize>), b: &(Found, Vec<usize>)) -> bool {
    Arc::ptr_eq(&a.0.dir, &b.0.dir)
}

/// One `link` run, shared by the walk's threads and the compile threads.
struct Run<'a> {
    store: &'a Store,
    domain: TrustDomain<'a>,
    options: &'a LinkOptions,
    interpreters: Vec<Interpreter>,
    materializer: Materializer<'a>,
    /// What the run counted and failed, and the index writes not yet
    /// applied (see [`record`]).
    ledger: Ledger<'a>,
    /// The misses being compiled, and the bodies compiled (see [`compile`]).
    compiles: Compiles,
    progress: &'a dyn Progress,
    now_ns: i64,
    /// The index's entries epoch when the run started (no `gc` or `verify
    /// --repair` runs beside a link: they hold the store's lock alone).
    entries_epoch: u64,
    /// Whether the warning about objects whose metadata changed was said.
    warned_metadata: AtomicBool,
    /// Whether the copies of other members' objects were said.
    warned_foreign: AtomicBool,
}

/// [`SourceDir::listing_after_run`] of each directory, on every core.
fn relist(dirs: Vec<&SourceDir>) -> Vec<(&SourceDir, Relisting)> {
    let now = now_ns();
    dirs.into_par_iter()
        .filter_map(|dir| Some((dir, dir.listing_after_run(now)?)))
        .collect()
}

/// How a pyc came to be settled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Settled {
    Hit,
    Compiled,
    Fetched,
}

impl Run<'_> {
    /// Makes the `__pycache__` of every directory the walk found without
    /// one, in walk order, while the lookups go on (which wait for a
    /// directory's if they reach it first): all made early in the run,
    /// rather than each when its first pyc is placed. A directory changed
    /// (by its new `__pycache__`) in the last 20 ms of a run cannot be
    /// listed again for the next run without waiting for its listing to be
    /// trusted (see `link`): made this way, few are. Each one made is
    /// recorded as the run's, so that `unlink` removes it even if no pyc
    /// gets placed in it (all of its sources fail, or the run stops). A
    /// directory's failure to make or open one is kept, and reported under
    /// each of its sources when placed.
    fn make_pycaches(&self, found: &[(Found, Vec<usize>)]) {
        for sources in found.chunk_by(same_dir) {
            let dir = &sources[0].0.dir;
            if dir.listed_pycache {
                continue;
            }
            if dir.pycache(true).is_ok_and(|pycache| pycache.first) {
                self.ledger.created_dir(&dir.path.join("__pycache__"));
            }
        }
    }

    /// Acts on one target ([`Run::act`]): its compile job, if it is one,
    /// failures reported.
    fn act_on(&self, target: Target) -> Option<CompileJob> {
        let path = target.source.path.clone();
        let interpreter = target.interpreter;
        self.act(target).unwrap_or_else(|e| {
            self.fail(&path, interpreter, e);
            None
        })
    }

    /// Reports that one pyc of the source at `path` failed.
    fn fail(&self, path: &Path, interpreter: usize, e: FileError) {
        self.ledger.fail(e.at(path), Some(interpreter), 1);
    }

    /// The entry slot of `target`'s flavor (and, for timestamp pycs, of its
    /// source's stat).
    fn slot(&self, target: &Target) -> EntrySlot {
        resolve::slot(
            self.options.flavor,
            target.source.meta.mtime(),
            target.source.meta.size(),
        )
    }
}

/// The remote tier's side of a run (see [`crate::remote`]): which misses
/// may travel, what is accepted from a remote, what is uploaded.
impl Run<'_> {
    /// Whether the pycs of `interpreter` may travel.
    fn remote_eligible(&self, interpreter: usize) -> bool {
        let interpreter = &self.interpreters[interpreter];
        crate::remote::eligible(interpreter.key_domain.as_ref(), interpreter.magic)
    }

    fn remote_key(&self, job: &CompileJob) -> Option<CompileKey> {
        self.remote_eligible(job.target.interpreter)
            .then_some(job.target.key)
    }

    /// The body of what a remote returned for `job`, if it checks out, with
    /// the entry it came in (for a bundle this run writes).
    fn accept_fetched(
        &self,
        job: &mut CompileJob,
    ) -> (
        Option<crate::remote::Accepted>,
        Option<crate::remote::BundleRecord>,
    ) {
        let (Some(remotes), Some(mut fetched)) = (&self.options.remotes, job.fetched.take()) else {
            return (None, None);
        };
        let record = fetched.take_record();
        let interpreter = &self.interpreters[job.target.interpreter];
        let Ok(source) = job.target.source.bytes() else {
            return (None, None);
        };
        let body = remotes.accept(
            fetched,
            interpreter.magic,
            interpreter.hash_variant,
            &source,
        );
        let record = record.filter(|_| body.is_some());
        (body, record)
    }

    /// Uploads what was compiled for `job`; returns its entry (for a
    /// bundle), if uploaded.
    fn upload(&self, job: &CompileJob, body: &[u8]) -> Option<crate::remote::BundleRecord> {
        let remotes = self.options.remotes.as_ref()?;
        let interpreter = &self.interpreters[job.target.interpreter];
        if self.remote_key(job).is_none() || !remotes.writable() {
            return None;
        }
        let source = job.target.source.bytes().ok()?;
        remotes.upload(
            &job.target.key,
            interpreter.magic,
            interpreter.hash_variant,
            &source,
            body,
        )
    }

    fn remote_warnings(&self) {
        if let Some(remotes) = &self.options.remotes {
            for message in remotes.take_warnings() {
                self.progress.warn(&message);
            }
        }
    }
}

pub(crate) fn open_no_follow(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches keep walk order, cover every source once, hold at most
    /// `LOOKUP_BATCH`, split only large directories, and put small
    /// neighbouring directories together.
    #[test]
    fn lookup_batches_group_small_directories_and_split_large_ones() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [("a", 1), ("b", 3), ("c", LOOKUP_BATCH + 6), ("d", 2)];
        for (name, n) in sizes {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            for i in 0..n {
                std::fs::write(dir.path().join(format!("{name}/m{i:03}.py")), "").unwrap();
            }
        }
        let excludes = Excludes::new(&[]).unwrap();
        let found: Vec<(Found, Vec<usize>)> = crate::walk::walk(dir.path(), &excludes, None)
            .found
            .into_iter()
            .map(|f| (f, vec![0]))
            .collect();
        let batches = lookup_batches(&found);
        let lens: Vec<usize> = batches.iter().map(|b| b.len()).collect();
        assert_eq!(lens, [4, LOOKUP_BATCH, 8]);
        let rejoined: Vec<&Path> = batches
            .iter()
            .flat_map(|b| b.iter().map(|(f, _)| f.path.as_path()))
            .collect();
        let walked: Vec<&Path> = found.iter().map(|(f, _)| f.path.as_path()).collect();
        assert_eq!(rejoined, walked);
        assert!(lookup_batches(&[]).is_empty());
    }
}
