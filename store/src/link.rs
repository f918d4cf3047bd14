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
//! Nothing stops at a bad file: each failure is reported with its path and
//! the run finishes the rest.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::Serialize;

use crate::compile::{Outcome, WorkerSlot};
use crate::index::{Counters, Entry, EntrySlot, Index, LinkRecord, Writes};
use crate::interpreter::Interpreter;
use crate::key::CompileKey;
use crate::materialize::{Access, Destination, LinkMode, Materializer};
use crate::objects::{ObjectId, PUBLIC_MODE};
use crate::pyc::{self, Flavor, HEADER_LEN};
use crate::resolve::{self, open_object, ObjectState};
use crate::source::{Hashed, Plan, Source};
use crate::util::{lock, now_ns};
use crate::walk::Excludes;
use crate::{Result, Store};

/// How often compile threads hand what they recorded to the index.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

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
    /// Exclude patterns (see [`Excludes`]).
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

/// A [`Progress`] that shows nothing but warnings.
pub struct NoProgress;
impl Progress for NoProgress {}

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
    let mut failures = Vec::new();
    crate::tree::raise_open_file_limit();
    let domain = TrustDomain::of(store);
    let run;
    {
        // Phase 1: one read-only index session for the probes and every
        // lookup; what it learns is written in one session at its end.
        let index = store.index_reader()?;
        let mut learned = Writes::default();
        let plan = Plan::resolve(prefixes, &options.python, &index, &mut learned)?;
        let (found, errors) = plan.walk(
            &excludes,
            &index,
            (!options.dry_run).then_some(&mut learned),
        );
        tracing::debug!(
            "found {} sources in {:.3}s",
            found.len(),
            started.elapsed().as_secs_f64()
        );
        failures.extend(
            errors
                .into_iter()
                .map(|(path, message)| Failure { path, message }),
        );
        let total: u64 = found
            .iter()
            .map(|(_, chosen)| (chosen.len() * optimize.len()) as u64)
            .sum();
        progress.start(total);
        run = Run {
            store,
            options,
            interpreters: plan.interpreters,
            materializer: Materializer::new(&store.objects, options.link_mode, &warn),
            domain,
            stats: Mutex::new(LinkStats {
                sources: found.len() as u64,
                pycs: total,
                ..LinkStats::default()
            }),
            failures: Mutex::new(failures),
            inflight: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
            writes: Mutex::new(learned),
            counters: Mutex::new(HashMap::new()),
            last_flush: Mutex::new(Instant::now()),
            session_open: AtomicBool::new(true),
            progress,
            now_ns: now_ns(),
            warned_metadata: AtomicBool::new(false),
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
            drop(rx);
            // Remote tier hook: with remotes, misses go to them first and
            // reach the compile threads with what was fetched, if anything.
            let tx = match &options.remotes {
                None => tx,
                Some(remotes) => {
                    let (miss_tx, miss_rx) = crossbeam_channel::unbounded::<CompileJob>();
                    let run = &run;
                    scope.spawn(move || {
                        remotes.fetch_misses(
                            miss_rx,
                            |job| run.remote_key(job),
                            move |mut job, fetched| {
                                job.fetched = fetched;
                                let _ = tx.send(job);
                            },
                        )
                    });
                    miss_tx
                }
            };
            let session = index.as_ref().expect("open until the walk ends");
            found.par_iter().for_each(|(found, chosen)| {
                for target in run.look_up(session, found, chosen, &optimize) {
                    let path = target.source.path.clone();
                    let interpreter = target.interpreter;
                    if let Err(message) = run.act(target, &tx) {
                        run.fail(&path, interpreter, message);
                    }
                }
            });
            tracing::debug!(
                "walked and looked up in {:.3}s",
                started.elapsed().as_secs_f64()
            );
            // What the walk learned is written with the compile threads'
            // results: by their periodic flush, or at the end.
            drop(index.take());
            run.session_open.store(false, Ordering::Relaxed);
            drop(tx);
            for worker in workers {
                worker.join().expect("compile threads do not panic");
            }
        });
        // Directories whose `__pycache__` this run made changed since the walk
        // listed them: listed again, so the next walk need not.
        if !options.dry_run {
            let now = now_ns();
            let mut last = None;
            for (found, _) in &found {
                if last.replace(Arc::as_ptr(&found.dir)) == Some(Arc::as_ptr(&found.dir)) {
                    continue;
                }
                if let Some(record) = found.dir.listing_after_run(now) {
                    lock(&run.writes).listing(&found.dir.path, &record);
                }
            }
        }
    }

    // Phase 3: record.
    tracing::debug!("compiled at {:.3}s", started.elapsed().as_secs_f64());
    if let Some(remotes) = &options.remotes {
        remotes.finish();
        run.remote_warnings();
    }
    if !options.dry_run {
        if let Err(e) = run.flush() {
            run.index_failed(e);
        }
        if let Some(remotes) = &options.remotes {
            if let Err(e) = store
                .index()
                .and_then(|mut index| remotes.record(&mut index))
            {
                tracing::debug!("cannot record the remotes' counters: {e}");
            }
        }
    }
    tracing::debug!("recorded at {:.3}s", started.elapsed().as_secs_f64());
    let Run {
        materializer,
        stats,
        failures,
        interpreters,
        ..
    } = run;
    Ok(LinkReport {
        stats: stats.into_inner().unwrap_or_else(|e| e.into_inner()),
        link_modes: materializer.modes_used(),
        interpreters,
        failures: failures.into_inner().unwrap_or_else(|e| e.into_inner()),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        remotes: options
            .remotes
            .as_ref()
            .map(|r| r.report())
            .unwrap_or_default(),
    })
}

/// What the index said about one wanted pyc.
enum Lookup {
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
struct Target {
    source: Arc<Source>,
    interpreter: usize,
    optimize: u8,
    key: CompileKey,
    pyc: PathBuf,
    lookup: Lookup,
    /// What an earlier run recorded of the pyc, for a hit.
    recorded: Option<LinkRecord>,
}

struct CompileJob {
    key: CompileKey,
    source: Arc<Source>,
    interpreter: usize,
    optimize: u8,
    /// What a remote returned for this miss, still to be checked.
    fetched: Option<crate::remote::Fetched>,
}

/// Whose trees may share the store's inodes, and who is placing pycs.
struct TrustDomain<'a> {
    objects: &'a crate::objects::Objects,
    /// Whether the caller is root (and can give pycs their source's owner).
    root: bool,
}

impl<'a> TrustDomain<'a> {
    fn of(store: &'a Store) -> TrustDomain<'a> {
        TrustDomain {
            objects: &store.objects,
            root: rustix::process::geteuid().is_root(),
        }
    }

    /// Who may read the pyc of `source`: a source every user may read gets
    /// a pyc every user may read, which may share the object's inode in a
    /// tree of the store's owner (or, for a group store, its group); any
    /// other source gets its own inode with its read bits, and its owner
    /// when root places it (as `compileall` would make it). Without root
    /// the pyc is the caller's, readable by the caller only.
    fn access(&self, source: &Source) -> Access {
        if source.meta.is_public() {
            return Access {
                mode: PUBLIC_MODE,
                owner: None,
                hardlink: self.objects.owner().owns(source.dir.uid, source.dir.gid),
            };
        }
        if self.root {
            Access {
                mode: source.meta.mode & 0o444,
                owner: Some((source.meta.uid, source.meta.gid)),
                hardlink: false,
            }
        } else {
            Access {
                mode: 0o400,
                owner: None,
                hardlink: false,
            }
        }
    }

    /// Whether an object's metadata is what the store gave it.
    fn object_ok(&self, st: &rustix::fs::Stat) -> bool {
        self.objects.stat_ok(st)
    }
}

/// The identity of an object checked for placing.
#[derive(Clone, Copy)]
struct Checked {
    dev: u64,
    ino: u64,
    mode: u32,
}

impl Checked {
    fn of(st: &rustix::fs::Stat) -> Checked {
        Checked {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode & 0o7777,
        }
    }
}

struct Run<'a> {
    store: &'a Store,
    domain: TrustDomain<'a>,
    options: &'a LinkOptions,
    interpreters: Vec<Interpreter>,
    materializer: Materializer<'a>,
    stats: Mutex<LinkStats>,
    failures: Mutex<Vec<Failure>>,
    /// Misses being compiled, with every target waiting for them.
    inflight: Mutex<HashMap<CompileKey, Vec<Target>>>,
    /// Bodies compiled by this run, recorded before their key leaves
    /// `inflight`, so a late miss of the same key uses them.
    compiled: Mutex<HashMap<CompileKey, (EntrySlot, Entry, Settled)>>,
    /// Index writes not yet applied.
    writes: Mutex<Writes>,
    /// Usage counters per interpreter.
    counters: Mutex<HashMap<usize, Counters>>,
    last_flush: Mutex<Instant>,
    /// While the lookup session is open, compile threads keep their writes.
    session_open: AtomicBool,
    progress: &'a dyn Progress,
    now_ns: i64,
    /// Whether the warning about objects whose metadata changed was said.
    warned_metadata: AtomicBool,
}

impl Run<'_> {
    fn count(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut lock(&self.stats));
    }

    fn tally(&self, interpreter: usize, f: impl FnOnce(&mut Counters)) {
        f(lock(&self.counters).entry(interpreter).or_default());
    }

    fn fail(&self, path: &Path, interpreter: usize, message: impl Into<String>) {
        self.fail_many(path, Some(interpreter), message, 1);
    }

    fn fail_many(
        &self,
        path: &Path,
        interpreter: Option<usize>,
        message: impl Into<String>,
        pycs: u64,
    ) {
        lock(&self.failures).push(Failure {
            path: path.to_path_buf(),
            message: message.into(),
        });
        self.count(|s| s.failed += pycs);
        if let Some(i) = interpreter {
            self.tally(i, |c| c.failures += pycs);
        }
        self.progress.advance(pycs);
    }

    /// For one source: hash it, look up each of its pycs.
    fn look_up(
        &self,
        index: &Index,
        found: &crate::walk::Found,
        chosen: &[usize],
        optimize: &[u8],
    ) -> Vec<Target> {
        let pycs = (chosen.len() * optimize.len()) as u64;
        let hashed = if self.options.dry_run {
            Source::hash(
                found,
                index,
                self.now_ns,
                None,
                self.options.max_source_size,
            )
        } else {
            let mut writes = Writes::default();
            let hashed = Source::hash(
                found,
                index,
                self.now_ns,
                Some(&mut writes),
                self.options.max_source_size,
            );
            lock(&self.writes).append(&mut writes);
            hashed
        };
        let source = match hashed {
            Hashed::Source(source) => Arc::<Source>::from(source),
            Hashed::Skipped => {
                self.count(|s| s.skipped += pycs);
                self.progress.advance(pycs);
                return Vec::new();
            }
            Hashed::Failed(message) => {
                self.fail_many(&found.path, None, message, pycs);
                return Vec::new();
            }
        };
        let mut targets = Vec::with_capacity(pycs as usize);
        for &i in chosen {
            let interpreter = &self.interpreters[i];
            for &optimize in optimize {
                let Some(pyc) = source.pyc_path(interpreter, optimize) else {
                    self.fail(&source.path, i, "not a module file name");
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
                        if matches!(lookup, Lookup::Entry(_)) {
                            target.recorded = index.link_record(&target.pyc);
                        }
                        target.lookup = lookup;
                        targets.push(target);
                    }
                    Err(e) => self.fail(&source.path, i, e.to_string()),
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

    fn slot(&self, target: &Target) -> EntrySlot {
        resolve::slot(
            self.options.flavor,
            target.source.meta.mtime(),
            target.source.meta.size(),
        )
    }

    /// For one pyc: up to date, a hit, a cached failure, or a compile job.
    fn act(
        &self,
        mut target: Target,
        tx: &crossbeam_channel::Sender<CompileJob>,
    ) -> std::result::Result<(), String> {
        let lookup = std::mem::replace(&mut target.lookup, Lookup::Miss);
        match lookup {
            Lookup::Entry(entry) => {
                if self.still_placed(&target, &entry) {
                    self.count(|s| s.up_to_date += 1);
                    self.progress.advance(1);
                    return Ok(());
                }
                if let Some(checked) = self.check_object(&entry) {
                    return self.settle(&target, &entry, Some(checked), Settled::Hit);
                }
            }
            Lookup::Body(body) if self.check_object(&body).is_some() => {
                if self.options.dry_run {
                    return self.settle(&target, &body, None, Settled::Hit);
                }
                if let Some(entry) = self.derive(&target, &body)? {
                    return self.settle(&target, &entry, None, Settled::Hit);
                }
            }
            Lookup::Rejected(message) => return Err(self.rejected(&target, &message)),
            _ => {}
        }
        if self.options.dry_run {
            self.count(|s| s.compiled += 1);
            self.progress.advance(1);
            return Ok(());
        }
        let mut inflight = lock(&self.inflight);
        if let Some(waiting) = inflight.get_mut(&target.key) {
            waiting.push(target);
            return Ok(());
        }
        let done = lock(&self.compiled).get(&target.key).copied();
        if let Some((slot, body, how)) = done {
            drop(inflight);
            let entry = if self.slot(&target) == slot {
                Some(body)
            } else {
                self.derive(&target, &body)?
            };
            return match entry {
                Some(entry) => self.settle(&target, &entry, None, how),
                None => Err("the object compiled by this run is unreadable".into()),
            };
        }
        let job = CompileJob {
            key: target.key,
            source: Arc::clone(&target.source),
            interpreter: target.interpreter,
            optimize: target.optimize,
            fetched: None,
        };
        inflight.insert(target.key, vec![target]);
        tx.send(job).expect("compile threads outlive the walk");
        Ok(())
    }

    /// Whether the pyc is still the object an earlier run hardlinked there,
    /// from one `stat` of the pyc: the inode recorded, with the size of the
    /// entry and the owner and mode of an object (the pyc's stat is the
    /// object's). Anything else goes the long way ([`Run::settle`]).
    fn still_placed(&self, target: &Target, entry: &Entry) -> bool {
        let Some(recorded) = &target.recorded else {
            return false;
        };
        let access = self.domain.access(&target.source);
        if !access.hardlink || access.mode != PUBLIC_MODE {
            return false;
        }
        let Some(name) = target.pyc.file_name() else {
            return false;
        };
        resolve::still_linked(&target.source.dir, name, recorded, entry)
            .is_some_and(|st| self.domain.object_ok(&st) && st.st_mode & 0o7777 == PUBLIC_MODE)
    }

    /// Checks an entry's object before it is placed ([`open_object`]):
    /// present with the recorded size and header, and with the owner and
    /// mode the store gave it. A missing or damaged object is a miss (and is
    /// rewritten by the compile that follows), never something to link; one
    /// whose metadata changed (a `chown -R` or `chmod` through a hardlink)
    /// gets a fresh inode first, once its bytes are checked against its
    /// name, so the change never reaches another tree.
    fn check_object(&self, entry: &Entry) -> Option<Checked> {
        if let Some(st) = resolve::sealed_object(&self.store.objects, entry) {
            return Some(Checked::of(&st));
        }
        let path = self.store.objects.path(&entry.object);
        let damaged = |len: u64| {
            self.progress.warn(&format!(
                "store object `{}` does not match its index entry ({len} bytes, {} expected); \
                 it will be rewritten (run `pycstore verify` to check the whole store)",
                path.display(),
                entry.size
            ));
        };
        let st = match open_object(&self.store.objects, entry) {
            // Changed since the store wrote it, or older than the seal: its
            // whole bytes must hash to its name before it is placed (and
            // sealed again).
            Ok(ObjectState::Good(object)) => {
                if !self.store.objects.intact(&entry.object) {
                    self.progress.warn(&format!(
                        "store object `{}` does not hash to its name (damaged); it will be \
                         rewritten (run `pycstore verify` to check the whole store)",
                        path.display()
                    ));
                    return None;
                }
                self.store.objects.seal(&entry.object);
                return Some(Checked::of(&object.stat));
            }
            Ok(ObjectState::Missing) | Err(_) => return None,
            Ok(ObjectState::Damaged { len }) => {
                damaged(len);
                return None;
            }
            Ok(ObjectState::Exposed(st)) => st,
        };
        let mode = if st.st_mode & 0o004 != 0 {
            PUBLIC_MODE
        } else {
            self.store.objects.private_mode()
        };
        if !self.warned_metadata.swap(true, Ordering::Relaxed) {
            self.progress.warn(&format!(
                "store object `{}` has owner {} and mode {:o}, not what the store gave it \
                 (a `chown`/`chmod` through a hardlinked pyc?); giving such objects a fresh \
                 inode before placing them (run `pycstore verify --repair` to fix the rest)",
                path.display(),
                st.st_uid,
                st.st_mode & 0o7777
            ));
        }
        match self.store.objects.reset(&entry.object, mode) {
            Ok(true) => self.identity(&entry.object),
            Ok(false) => {
                damaged(st.st_size as u64);
                None
            }
            Err(_) => None,
        }
    }

    /// The identity of an object this run just checked or wrote.
    fn identity(&self, object: &ObjectId) -> Option<Checked> {
        let st = rustix::fs::stat(self.store.objects.path(object)).ok()?;
        self.domain.object_ok(&st).then(|| Checked::of(&st))
    }

    /// Makes this target's flavor from a stored body; `None` when the body's
    /// object does not match its entry (then it is recompiled).
    fn derive(&self, target: &Target, body: &Entry) -> std::result::Result<Option<Entry>, String> {
        match self.store.objects.read(&body.object) {
            Ok(bytes) if bytes.len() as u64 == body.size && bytes[..HEADER_LEN] == body.header => {
                self.store_pyc(
                    target,
                    self.slot(target),
                    &bytes[HEADER_LEN..],
                    false,
                    false,
                )
                .map(Some)
            }
            Ok(_) => {
                self.progress.warn(&format!(
                    "store object {:?} does not match its index entry; recompiling `{}`",
                    body.object,
                    target.source.path.display()
                ));
                Ok(None)
            }
            Err(e) => {
                self.progress.warn(&format!(
                    "{e}; recompiling `{}`",
                    target.source.path.display()
                ));
                Ok(None)
            }
        }
    }

    fn rejected(&self, target: &Target, message: &str) -> String {
        format!(
            "does not compile for {}: {message}",
            self.interpreters[target.interpreter].cache_tag
        )
    }

    /// What is at the pyc's name now, against the object to place there:
    /// its very inode where a hardlink is allowed, or the same header and
    /// size (for one source and flavor only the body could differ, and a body
    /// of the same size compiled from the same source is the same code) no
    /// more readable than the source and sharing no inode it should not.
    /// Anything else there (stale, truncated, another flavor, a symlink, a
    /// hardlink where none may be) is replaced by the store's known-good
    /// object.
    fn existing(
        &self,
        dir: Option<BorrowedFd<'_>>,
        name: &OsStr,
        entry: &Entry,
        object: Option<Checked>,
        access: &Access,
    ) -> Existing {
        let Some(dir) = dir else {
            return Existing::Other;
        };
        let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            return Existing::Other;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Existing::Other;
        }
        if let Some(object) = object {
            if (st.st_dev, st.st_ino) == (object.dev, object.ino) {
                return if access.hardlink && object.mode == access.mode {
                    Existing::Ours
                } else {
                    Existing::Other
                };
            }
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(dir, name, flags, Mode::empty()) else {
            return Existing::Other;
        };
        let mut header = [0u8; HEADER_LEN];
        if std::fs::File::from(fd).read_exact(&mut header).is_err() {
            return Existing::Other;
        }
        if header[..4] == entry.header[..4]
            && header[4..8] != entry.header[4..8]
            && matches!(
                u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
                0 | 1 | 3
            )
        {
            return Existing::OtherMode;
        }
        // An inode shared with other names that is not the object: an
        // object's old inode where no hardlink may be, or one whose owner or
        // mode changed (a `chown -R` of another tree holding it).
        let shared_badly = st.st_nlink > 1
            && (!access.hardlink
                || !self.domain.object_ok(&st)
                || st.st_mode & 0o7777 != PUBLIC_MODE);
        if header == entry.header
            && st.st_size as u64 == entry.size
            && st.st_mode & 0o444 & !access.mode == 0
            && !shared_badly
        {
            return Existing::Identical;
        }
        Existing::Other
    }

    /// Remembers that the pyc of `target` is the store's object (its very
    /// inode, when `inode` says which).
    fn record_link(&self, target: &Target, entry: &Entry, inode: Option<(u64, u64)>) {
        let mut writes = lock(&self.writes);
        let trusted = self.interpreters[target.interpreter].key_domain.is_none();
        writes.link(&target.pyc, entry, self.options.flavor, trusted, inode);
        writes.used(&entry.object, (self.now_ns / 1_000_000_000) as u64);
    }

    /// Writes the object for `target` with `body` and records its entries.
    fn store_pyc(
        &self,
        target: &Target,
        slot: EntrySlot,
        body: &[u8],
        new_body: bool,
        body_checked: bool,
    ) -> std::result::Result<Entry, String> {
        let interpreter = &self.interpreters[target.interpreter];
        let input = target
            .source
            .header_input(interpreter, self.options.flavor)?;
        let header = pyc::header(interpreter.magic, self.options.flavor, input);
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(body);
        if new_body && !body_checked {
            // What a compile worker answered must be one loadable code object.
            match crate::marshal::check_pyc(&bytes) {
                Err(e) if e.is_damage() => {
                    return Err(format!("the compiler's output is not a loadable pyc: {e}"))
                }
                _ => {}
            }
        }
        let mode = resolve::object_mode(&self.store.objects, target.source.meta.mode);
        let object = self
            .store
            .objects
            .put_mode(&bytes, mode)
            .map_err(|e| e.to_string())?;
        let entry = Entry {
            object,
            size: bytes.len() as u64,
            header,
        };
        let mut writes = lock(&self.writes);
        writes.entry(&target.key, slot, &entry);
        if new_body {
            writes.entry(&target.key, EntrySlot::Body, &entry);
        }
        Ok(entry)
    }

    /// Leaves the destination alone when it already holds the object, else
    /// places the object there.
    fn settle(
        &self,
        target: &Target,
        entry: &Entry,
        object: Option<Checked>,
        how: Settled,
    ) -> std::result::Result<(), String> {
        let access = self.domain.access(&target.source);
        let pycache = target.source.dir.pycache(!self.options.dry_run)?;
        let dir = pycache.fd;
        let Some(name) = target.pyc.file_name() else {
            return Err("not a module file name".into());
        };
        let object = object.or_else(|| self.identity(&entry.object));
        // A `__pycache__` this run made held nothing: no need to look.
        let existing = if pycache.made {
            Existing::Other
        } else {
            self.existing(dir, name, entry, object, &access)
        };
        match existing {
            Existing::Ours => {
                // A record from before inodes were recorded, or of an
                // object's earlier inode: the next run needs one stat.
                let inode = object.map(|o| (o.dev, o.ino));
                let recorded = target.recorded.as_ref().and_then(|r| r.inode);
                if !self.options.dry_run && inode.is_some() && recorded != inode {
                    self.record_link(target, entry, inode);
                }
                self.count(|s| s.up_to_date += 1);
                self.progress.advance(1);
                return Ok(());
            }
            // The same bytes, put there by another tool (uv, `compileall
            // --invalidation-mode checked-hash`) or copied by an earlier run:
            // kept, and remembered as linked from the store.
            Existing::Identical => {
                if !self.options.dry_run {
                    self.record_link(target, entry, None);
                }
                self.tally(target.interpreter, |c| match how {
                    Settled::Compiled | Settled::Fetched => c.misses += 1,
                    Settled::Hit => c.hits += 1,
                });
                self.count(|s| match how {
                    Settled::Compiled => s.compiled += 1,
                    Settled::Fetched => s.fetched += 1,
                    Settled::Hit => s.up_to_date += 1,
                });
                self.progress.advance(1);
                return Ok(());
            }
            Existing::OtherMode => self.count(|s| s.replaced_other_mode += 1),
            Existing::Other => {}
        }
        if self.options.dry_run {
            self.count(|s| s.hits += 1);
            self.progress.advance(1);
            return Ok(());
        }
        let Some(dir) = dir else {
            return Err(format!(
                "`{}` could not be opened",
                target.source.dir.path.join("__pycache__").display()
            ));
        };
        if pycache.first {
            lock(&self.writes).created_dir(&target.source.dir.path.join("__pycache__"));
        }
        // A private object now wanted by a source every user may read: its
        // bytes are public, give it the public mode before sharing its inode.
        let object = if access.hardlink && object.is_some_and(|o| o.mode != PUBLIC_MODE) {
            let _ = self.store.objects.reset(&entry.object, PUBLIC_MODE);
            self.identity(&entry.object)
        } else {
            object
        };
        let dest = Destination {
            dir,
            name,
            path: &target.pyc,
            dev: target.source.dir.dev,
            access,
        };
        let mode = self
            .materializer
            .place(&entry.object, &dest)
            .map_err(|e| e.to_string())?;
        let inode = object
            .filter(|_| mode == LinkMode::Hardlink)
            .map(|o| (o.dev, o.ino));
        self.record_link(target, entry, inode);
        self.tally(target.interpreter, |c| match how {
            Settled::Compiled | Settled::Fetched => c.misses += 1,
            Settled::Hit => c.hits += 1,
        });
        self.count(|s| {
            match how {
                Settled::Compiled => s.compiled += 1,
                Settled::Fetched => s.fetched += 1,
                Settled::Hit => s.hits += 1,
            }
            if mode.shares_blocks() {
                s.bytes_shared += entry.size;
            } else {
                s.bytes_copied += entry.size;
            }
        });
        self.progress.advance(1);
        Ok(())
    }

    /// A compile thread: one worker process per interpreter, started lazily.
    fn compile_loop(&self, jobs: crossbeam_channel::Receiver<CompileJob>) {
        let mut slots: Vec<Option<WorkerSlot>> =
            (0..self.interpreters.len()).map(|_| None).collect();
        for mut job in jobs {
            // Remote tier hook: a fetched pyc that checks out is used as if
            // compiled here; anything else is compiled.
            let fetched = self.accept_fetched(&mut job);
            let how = if fetched.is_some() {
                Settled::Fetched
            } else {
                Settled::Compiled
            };
            let outcome = match fetched {
                Some(body) => Outcome::Compiled(body),
                None => {
                    let slot = slots[job.interpreter].get_or_insert_with(|| {
                        WorkerSlot::new(
                            self.interpreters[job.interpreter].executable.clone(),
                            self.options.timeout,
                        )
                    });
                    let outcome = match job.source.bytes() {
                        Ok(bytes) => slot.compile(&bytes, &job.source.path, job.optimize),
                        Err(message) => Outcome::WorkerFailed(message),
                    };
                    self.tally(job.interpreter, |c| c.compiles += 1);
                    outcome
                }
            };
            // Record the result while the key is still in flight, so a miss
            // of the same key arriving now finds it instead of compiling again.
            let targets = {
                let mut inflight = lock(&self.inflight);
                let stored = match &outcome {
                    Outcome::Compiled(body) => {
                        let first = &inflight[&job.key][0];
                        let slot = self.slot(first);
                        // A fetched body was checked when it was accepted.
                        let checked = how == Settled::Fetched;
                        let stored = self.store_pyc(first, slot, body, true, checked);
                        if let Ok(entry) = &stored {
                            lock(&self.compiled).insert(job.key, (slot, *entry, how));
                            if how == Settled::Compiled {
                                self.upload(&job, body);
                            }
                        }
                        Some(stored.map(|entry| (slot, entry)))
                    }
                    Outcome::Rejected(message) => {
                        lock(&self.writes).failure(&job.key, message);
                        None
                    }
                    Outcome::WorkerFailed(_) => None,
                };
                (inflight.remove(&job.key).unwrap_or_default(), stored)
            };
            let (targets, stored) = targets;
            for target in targets {
                let interpreter = target.interpreter;
                let result = match (&outcome, &stored) {
                    (Outcome::Compiled(_), Some(Err(message))) => Err(message.clone()),
                    (Outcome::Compiled(body), Some(Ok((slot, entry)))) => {
                        // Timestamp pycs of sources with other stats need their own header.
                        let entry = if self.slot(&target) == *slot {
                            Ok(*entry)
                        } else {
                            self.store_pyc(&target, self.slot(&target), body, false, false)
                        };
                        entry.and_then(|entry| self.settle(&target, &entry, None, how))
                    }
                    (Outcome::Rejected(message), _) => Err(self.rejected(&target, message)),
                    (Outcome::WorkerFailed(message), _) => Err(message.clone()),
                    (Outcome::Compiled(_), None) => unreachable!("compiled outcomes are stored"),
                };
                if let Err(message) = result {
                    self.fail(&target.source.path, interpreter, message);
                }
            }
            self.remote_warnings();
            let due = !self.session_open.load(Ordering::Relaxed)
                && lock(&self.last_flush).elapsed() >= FLUSH_EVERY;
            if due {
                *lock(&self.last_flush) = Instant::now();
                if let Err(e) = self.flush() {
                    self.progress
                        .warn(&format!("cannot record progress in the index yet: {e}"));
                }
            }
        }
    }

    /// Reports that what this run learned could not be recorded: the pycs
    /// placed are fine, the next run compiles their objects' entries again.
    fn index_failed(&self, e: crate::Error) {
        lock(&self.failures).push(Failure {
            path: self.store.index_path(),
            message: format!("{e}; what this run compiled is not recorded"),
        });
    }

    /// Applies the pending writes and counters in one index session.
    fn flush(&self) -> Result<()> {
        let mut writes = std::mem::take(&mut *lock(&self.writes));
        for (i, counters) in lock(&self.counters).drain() {
            writes.count(&counter_label(&self.interpreters[i]), counters);
        }
        if writes.is_empty() {
            return Ok(());
        }
        self.store.index()?.apply(writes)
    }
}

/// What is at a pyc's name before placing (see [`Run::existing`]).
enum Existing {
    /// The object itself (its inode, where a hardlink is allowed).
    Ours,
    /// The object's bytes, in a file of its own.
    Identical,
    /// A pyc of this interpreter in another invalidation mode: someone may
    /// have made it so on purpose; replaced, and said.
    OtherMode,
    /// Nothing, or anything else.
    Other,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Settled {
    Hit,
    Compiled,
    Fetched,
}

/// The remote tier's side of a run (see [`crate::remote`]): which misses
/// may travel, what is accepted from a remote, what is uploaded.
impl Run<'_> {
    fn remote_key(&self, job: &CompileJob) -> Option<CompileKey> {
        let interpreter = &self.interpreters[job.interpreter];
        crate::remote::eligible(interpreter.key_domain.as_ref(), interpreter.magic)
            .then_some(job.key)
    }

    fn accept_fetched(&self, job: &mut CompileJob) -> Option<Vec<u8>> {
        let (remotes, fetched) = (self.options.remotes.as_ref()?, job.fetched.take()?);
        let interpreter = &self.interpreters[job.interpreter];
        let source = job.source.bytes().ok()?;
        remotes.accept(
            fetched,
            interpreter.magic,
            interpreter.hash_variant,
            &source,
        )
    }

    fn upload(&self, job: &CompileJob, body: &[u8]) {
        let Some(remotes) = &self.options.remotes else {
            return;
        };
        let interpreter = &self.interpreters[job.interpreter];
        if self.remote_key(job).is_none() || !remotes.writable() {
            return;
        }
        if let Ok(source) = job.source.bytes() {
            remotes.upload(
                &job.key,
                interpreter.magic,
                interpreter.hash_variant,
                &source,
                body,
            );
        }
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
