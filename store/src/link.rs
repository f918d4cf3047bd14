//! `link`: put a valid pyc beside every source of one or more prefixes.
//!
//! The pipeline, per source file: stat it; take its blake3 from the stat
//! cache or read and hash it; for each interpreter and optimize level derive
//! the compile key and look it up. A hit costs a link. A miss goes to the
//! compile pool (interpreter processes started on the first miss, so a warm
//! run starts none), whose threads write the object, record the entry and
//! place the pyc while the walk goes on. Misses of one key compile once.
//!
//! Nothing stops at a bad file: each failure is reported with its path and
//! the run finishes the rest.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::Serialize;

use crate::compile::{Outcome, WorkerSlot};
use crate::index::{Entry, EntrySlot, StatRecord};
use crate::interpreter::{self, Interpreter};
use crate::key::{CompileKey, SourceDigest, COMPILE_FLAGS_DEFAULT};
use crate::materialize::{LinkMode, Materializer};
use crate::pyc::{self, Flavor, HeaderInput, HEADER_LEN};
use crate::walk::{self, Excludes, Found};
use crate::{Result, Store};

/// A stat-cache record is trusted only for files whose last change is older
/// than the moment they were hashed by more than the filesystem's timestamp
/// granularity: a file changed again within the same clock tick could
/// otherwise hide its change. Kernel file times tick every few milliseconds;
/// filesystems with whole-second times get a two-second window.
const RACY_WINDOW_NS: i64 = 100_000_000;
const RACY_WINDOW_COARSE_NS: i64 = 2_000_000_000;

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
    /// Exclude patterns (see [`walk::Excludes`]).
    pub excludes: Vec<String>,
    /// Report what would happen, write nothing.
    pub dry_run: bool,
    /// Per-file compile timeout.
    pub timeout: Option<Duration>,
}

/// Counters of one `link` run.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LinkStats {
    /// `.py` files found under the prefixes.
    pub sources: u64,
    /// pycs wanted: sources × interpreters × optimize levels.
    pub pycs: u64,
    /// Valid pycs of the wanted flavor already in place, left alone.
    pub up_to_date: u64,
    /// pycs placed from objects the store already had.
    pub hits: u64,
    /// pycs compiled by this run (compile misses).
    pub compiled: u64,
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
}

/// Where `link` reports progress and warnings (a progress bar, or nothing).
pub trait Progress: Sync {
    /// The number of pycs the run will consider.
    fn start(&self, _total: u64) {}
    /// `n` more pycs were settled.
    fn advance(&self, _n: u64) {}
    /// A warning for the user, said once.
    fn warn(&self, message: &str) {
        eprintln!("pycstore: warning: {message}");
    }
}

/// A [`Progress`] that shows nothing but warnings.
pub struct NoProgress;
impl Progress for NoProgress {}

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

    // Which interpreters serve which prefix.
    let mut interpreters: Vec<Interpreter> = Vec::new();
    let index_of = |exe: &Path, interpreters: &mut Vec<Interpreter>| -> Result<usize> {
        if let Some(i) = interpreters.iter().position(|p| p.executable == exe) {
            return Ok(i);
        }
        interpreters.push(Interpreter::probe(exe, Some(&store.index))?);
        Ok(interpreters.len() - 1)
    };
    let mut plan: Vec<(PathBuf, Vec<usize>)> = Vec::new();
    for prefix in prefixes {
        let prefix = std::path::absolute(prefix)?;
        let chosen = if options.python.is_empty() {
            vec![index_of(
                &interpreter::find_in_prefix(&prefix)?,
                &mut interpreters,
            )?]
        } else {
            options
                .python
                .iter()
                .map(|exe| index_of(exe, &mut interpreters))
                .collect::<Result<Vec<_>>>()?
        };
        plan.push((prefix, chosen));
    }

    let mut failures = Vec::new();
    let mut sources = Vec::new();
    for (prefix, chosen) in &plan {
        if !prefix.is_dir() {
            failures.push(Failure {
                path: prefix.clone(),
                message: "not a directory".into(),
            });
            continue;
        }
        let (found, errors) = walk::walk(prefix, &excludes);
        failures.extend(
            errors
                .into_iter()
                .map(|(path, message)| Failure { path, message }),
        );
        sources.extend(found.into_iter().map(|f| (f, chosen.clone())));
    }

    let mut optimize = options.optimize.clone();
    optimize.sort_unstable();
    optimize.dedup();
    let per_source = |chosen: &Vec<usize>| (chosen.len() * optimize.len()) as u64;
    let total: u64 = sources.iter().map(|(_, c)| per_source(c)).sum();
    progress.start(total);

    let warn = |message: String| progress.warn(&message);
    let run = Run {
        store,
        options,
        optimize,
        interpreters: &interpreters,
        materializer: Materializer::new(&store.objects, options.link_mode, &warn),
        stats: Mutex::new(LinkStats {
            sources: sources.len() as u64,
            pycs: total,
            ..LinkStats::default()
        }),
        failures: Mutex::new(failures),
        inflight: Mutex::new(HashMap::new()),
        progress,
        now_ns: now_ns(),
    };

    let (tx, rx) = crossbeam_channel::unbounded::<CompileJob>();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..options.jobs.max(1))
            .map(|_| {
                let rx = rx.clone();
                let run = &run;
                scope.spawn(move || run.compile_loop(rx))
            })
            .collect();
        drop(rx);
        sources
            .par_iter()
            .for_each(|(found, chosen)| run.source(found, chosen, &tx));
        drop(tx);
        for worker in workers {
            worker.join().expect("compile threads do not panic");
        }
    });

    let link_modes = run.materializer.modes_used();
    let stats = run.stats.into_inner().unwrap();
    let failures = run.failures.into_inner().unwrap();
    Ok(LinkReport {
        stats,
        link_modes,
        interpreters,
        failures,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}

/// A source file being linked: its stat, its digest, and its bytes once read.
struct Source {
    path: PathBuf,
    dir_dev: u64,
    meta: std::fs::Metadata,
    digest: SourceDigest,
    bytes: OnceLock<std::result::Result<Arc<Vec<u8>>, String>>,
}

impl Source {
    /// The source bytes, read at most once and checked against the digest
    /// the keys were made from.
    fn bytes(&self) -> std::result::Result<Arc<Vec<u8>>, String> {
        self.bytes
            .get_or_init(|| {
                let bytes = read_source(&self.path).map_err(|e| e.to_string())?;
                if SourceDigest::of(&bytes) != self.digest {
                    return Err("changed while being linked".into());
                }
                Ok(Arc::new(bytes))
            })
            .clone()
    }

    fn header_input(
        &self,
        interpreter: &Interpreter,
        flavor: Flavor,
    ) -> std::result::Result<HeaderInput, String> {
        Ok(match flavor {
            Flavor::Timestamp => HeaderInput::Stat {
                mtime: self.meta.mtime(),
                size: self.meta.size(),
            },
            _ => HeaderInput::Hash(pyc::source_hash(
                interpreter.hash_variant,
                interpreter.magic,
                &self.bytes()?,
            )),
        })
    }
}

/// One pyc to produce.
struct Target {
    source: Arc<Source>,
    interpreter: usize,
    optimize: u8,
    key: CompileKey,
    pyc: PathBuf,
}

struct CompileJob {
    key: CompileKey,
    source: Arc<Source>,
    interpreter: usize,
    optimize: u8,
}

struct Run<'a> {
    store: &'a Store,
    options: &'a LinkOptions,
    optimize: Vec<u8>,
    interpreters: &'a [Interpreter],
    materializer: Materializer<'a>,
    stats: Mutex<LinkStats>,
    failures: Mutex<Vec<Failure>>,
    /// Misses being compiled, with every target waiting for them.
    inflight: Mutex<HashMap<CompileKey, Vec<Target>>>,
    progress: &'a dyn Progress,
    now_ns: i64,
}

impl Run<'_> {
    fn count(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut self.stats.lock().unwrap());
    }

    fn fail(&self, path: &Path, message: impl Into<String>, pycs: u64) {
        self.failures.lock().unwrap().push(Failure {
            path: path.to_path_buf(),
            message: message.into(),
        });
        self.count(|s| s.failed += pycs);
        self.progress.advance(pycs);
    }

    /// Settles every pyc of one source file.
    fn source(&self, found: &Found, chosen: &[usize], tx: &crossbeam_channel::Sender<CompileJob>) {
        let pycs = (chosen.len() * self.optimize.len()) as u64;
        let source = match self.hash(found) {
            Ok(Some(source)) => Arc::new(source),
            Ok(None) => {
                self.count(|s| s.skipped += pycs);
                self.progress.advance(pycs);
                return;
            }
            Err(message) => return self.fail(&found.path, message, pycs),
        };
        let (Some(dir), Some(name)) = (source.path.parent(), source.path.file_name()) else {
            return self.fail(&found.path, "not a file path", pycs);
        };
        let stem = &name.as_encoded_bytes()[..name.len() - 3];
        // SAFETY: `stem` is a prefix of an OsStr ending in the ASCII ".py".
        let stem = unsafe { std::ffi::OsStr::from_encoded_bytes_unchecked(stem) };
        for &i in chosen {
            let interpreter = &self.interpreters[i];
            for &optimize in &self.optimize {
                let mut file = OsString::from(stem);
                file.push(pyc_suffix(interpreter, optimize));
                let target = Target {
                    source: Arc::clone(&source),
                    interpreter: i,
                    optimize,
                    key: CompileKey::new(
                        &source.digest,
                        interpreter.magic,
                        optimize,
                        COMPILE_FLAGS_DEFAULT,
                    ),
                    pyc: dir.join("__pycache__").join(file),
                };
                if let Err(message) = self.target(target, tx) {
                    self.fail(&found.path, message, 1);
                }
            }
        }
    }

    /// Stats and hashes a source; `None` when it vanished.
    fn hash(&self, found: &Found) -> std::result::Result<Option<Source>, String> {
        let meta = match std::fs::metadata(&found.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot stat: {e}")),
        };
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        let ctime_ns = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
        let cached = self
            .store
            .index
            .stat(&found.path)
            .map_err(|e| e.to_string())?;
        let fresh = |r: &StatRecord| {
            r.dev == meta.dev()
                && r.ino == meta.ino()
                && r.size == meta.size()
                && r.mtime_ns == mtime_ns
                && r.ctime_ns == ctime_ns
                && ctime_ns.max(mtime_ns) + racy_window(&meta) < r.seen_ns
        };
        let bytes = OnceLock::new();
        let digest = match cached.filter(fresh) {
            Some(record) => record.digest,
            None => {
                let data = match read_source(&found.path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(format!("cannot read: {e}")),
                };
                let digest = SourceDigest::of(&data);
                if data.len() as u64 != meta.size() {
                    // Changed between stat and read: leave it for the next run.
                    return Ok(None);
                }
                if !self.options.dry_run {
                    let record = StatRecord {
                        dev: meta.dev(),
                        ino: meta.ino(),
                        size: meta.size(),
                        mtime_ns,
                        ctime_ns,
                        seen_ns: self.now_ns,
                        digest,
                    };
                    self.store
                        .index
                        .put_stat(&found.path, &record)
                        .map_err(|e| e.to_string())?;
                }
                let _ = bytes.set(Ok(Arc::new(data)));
                digest
            }
        };
        Ok(Some(Source {
            path: found.path.clone(),
            dir_dev: found.dir_dev,
            meta,
            digest,
            bytes,
        }))
    }

    fn slot(&self, target: &Target) -> EntrySlot {
        match self.options.flavor {
            Flavor::Timestamp => EntrySlot::Timestamp {
                mtime: target.source.meta.mtime(),
                size: target.source.meta.size(),
            },
            flavor => EntrySlot::Hashed(flavor),
        }
    }

    /// Settles one pyc: up to date, a hit, a cached failure, or a compile job.
    fn target(
        &self,
        target: Target,
        tx: &crossbeam_channel::Sender<CompileJob>,
    ) -> std::result::Result<(), String> {
        self.settle_or_compile(target, tx, true)
    }

    fn settle_or_compile(
        &self,
        target: Target,
        tx: &crossbeam_channel::Sender<CompileJob>,
        recheck: bool,
    ) -> std::result::Result<(), String> {
        let index = &self.store.index;
        if let Some(entry) = self.usable_entry(&target, self.slot(&target))? {
            return self.settle(&target, &entry, Settled::Hit);
        }
        if let Some(body) = self.usable_entry(&target, EntrySlot::Body)? {
            // Compiled before in another flavor: swap the header.
            if self.options.dry_run {
                return self.settle(&target, &body, Settled::Hit);
            }
            match self.store.objects.read(&body.object) {
                Ok(bytes)
                    if bytes.len() as u64 == body.size && bytes[..HEADER_LEN] == body.header =>
                {
                    let entry =
                        self.store_pyc(&target, self.slot(&target), &bytes[HEADER_LEN..])?;
                    return self.settle(&target, &entry, Settled::Hit);
                }
                Ok(_) => self.progress.warn(&format!(
                    "store object {:?} does not match its index entry; recompiling `{}`",
                    body.object,
                    target.source.path.display()
                )),
                Err(e) => self.progress.warn(&format!(
                    "{e}; recompiling `{}`",
                    target.source.path.display()
                )),
            }
        }
        if let Some(message) = index.failure(&target.key).map_err(|e| e.to_string())? {
            return Err(self.rejected(&target, &message));
        }
        if self.options.dry_run {
            self.count(|s| s.compiled += 1);
            self.progress.advance(1);
            return Ok(());
        }
        let mut inflight = self.inflight.lock().unwrap();
        if let Some(waiting) = inflight.get_mut(&target.key) {
            waiting.push(target);
            return Ok(());
        }
        // A compile of this key may have finished since the lookups above:
        // it records the body before leaving `inflight`.
        if recheck && self.usable_entry(&target, EntrySlot::Body)?.is_some() {
            drop(inflight);
            return self.settle_or_compile(target, tx, false);
        }
        let job = CompileJob {
            key: target.key,
            source: Arc::clone(&target.source),
            interpreter: target.interpreter,
            optimize: target.optimize,
        };
        inflight.insert(target.key, vec![target]);
        tx.send(job).expect("compile threads outlive the walk");
        Ok(())
    }

    /// An index entry whose object is present with the recorded size. A
    /// missing or damaged object is a miss (and is rewritten by the compile
    /// that follows), never something to link.
    fn usable_entry(
        &self,
        target: &Target,
        slot: EntrySlot,
    ) -> std::result::Result<Option<Entry>, String> {
        let Some(entry) = self
            .store
            .index
            .entry(&target.key, slot)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let path = self.store.objects.path(&entry.object);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == entry.size => Ok(Some(entry)),
            Ok(meta) => {
                self.progress.warn(&format!(
                    "store object `{}` has {} bytes, its index entry says {}; it will be rewritten \
                     (run `pycstore verify` to check the whole store)",
                    path.display(),
                    meta.len(),
                    entry.size
                ));
                Ok(None)
            }
            Err(_) => Ok(None),
        }
    }

    fn rejected(&self, target: &Target, message: &str) -> String {
        format!(
            "does not compile for {}: {message}",
            self.interpreters[target.interpreter].cache_tag
        )
    }

    /// Whether the destination already holds exactly this object's bytes
    /// (same header and size: for one source and flavor only the body could
    /// differ, and a body of the same size compiled from the same source is
    /// the same code). Anything else there (stale, truncated, another
    /// flavor, a symlink) is replaced by the store's known-good object.
    fn up_to_date(&self, target: &Target, entry: &Entry) -> bool {
        let Ok(mut file) = open_no_follow(&target.pyc) else {
            return false;
        };
        let mut header = [0u8; HEADER_LEN];
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        len == entry.size && file.read_exact(&mut header).is_ok() && header == entry.header
    }

    /// Writes the object for `target` with `body` and records its entries.
    fn store_pyc(
        &self,
        target: &Target,
        slot: EntrySlot,
        body: &[u8],
    ) -> std::result::Result<Entry, String> {
        let interpreter = &self.interpreters[target.interpreter];
        let input = target
            .source
            .header_input(interpreter, self.options.flavor)?;
        let header = pyc::header(interpreter.magic, self.options.flavor, input);
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(body);
        let object = self.store.objects.put(&bytes).map_err(|e| e.to_string())?;
        let entry = Entry {
            object,
            size: bytes.len() as u64,
            header,
        };
        let index = &self.store.index;
        index
            .put_entry(&target.key, slot, &entry)
            .map_err(|e| e.to_string())?;
        if index
            .entry(&target.key, EntrySlot::Body)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            index
                .put_entry(&target.key, EntrySlot::Body, &entry)
                .map_err(|e| e.to_string())?;
        }
        Ok(entry)
    }

    /// Leaves the destination alone when it already holds the object, else
    /// places the object there.
    fn settle(
        &self,
        target: &Target,
        entry: &Entry,
        how: Settled,
    ) -> std::result::Result<(), String> {
        if self.up_to_date(target, entry) {
            self.count(|s| s.up_to_date += 1);
            self.progress.advance(1);
            return Ok(());
        }
        if self.options.dry_run {
            self.count(|s| s.hits += 1);
            self.progress.advance(1);
            return Ok(());
        }
        ensure_pycache(target.pyc.parent().expect("pyc paths have a parent"))?;
        let mode = self
            .materializer
            .place(&entry.object, &target.pyc, target.source.dir_dev)
            .map_err(|e| e.to_string())?;
        self.store
            .index
            .put_link(&target.pyc, &entry.object, self.options.flavor)
            .map_err(|e| e.to_string())?;
        self.count(|s| {
            match how {
                Settled::Compiled => s.compiled += 1,
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
        for job in jobs {
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
            // Record the result while the key is still in flight, so a miss
            // of the same key arriving now finds it instead of compiling again.
            let first = match &outcome {
                Outcome::Compiled(body) => {
                    let inflight = self.inflight.lock().unwrap();
                    let first = &inflight[&job.key][0];
                    let slot = self.slot(first);
                    Some(self.store_pyc(first, slot, body).map(|entry| (slot, entry)))
                }
                Outcome::Rejected(message) => {
                    if let Err(e) = self.store.index.put_failure(&job.key, message) {
                        tracing::debug!("cannot remember a compile failure: {e}");
                    }
                    None
                }
                Outcome::WorkerFailed(_) => None,
            };
            let targets = self
                .inflight
                .lock()
                .unwrap()
                .remove(&job.key)
                .unwrap_or_default();
            for target in targets {
                let result = match (&outcome, &first) {
                    (Outcome::Compiled(_), Some(Err(message))) => Err(message.clone()),
                    (Outcome::Compiled(body), Some(Ok((slot, entry)))) => {
                        // Timestamp pycs of sources with other stats need their own header.
                        let entry = if self.slot(&target) == *slot {
                            Ok(*entry)
                        } else {
                            self.store_pyc(&target, self.slot(&target), body)
                        };
                        entry.and_then(|entry| self.settle(&target, &entry, Settled::Compiled))
                    }
                    (Outcome::Rejected(message), _) => Err(self.rejected(&target, message)),
                    (Outcome::WorkerFailed(message), _) => Err(message.clone()),
                    (Outcome::Compiled(_), None) => unreachable!("compiled outcomes are stored"),
                };
                if let Err(message) = result {
                    self.fail(&target.source.path, message, 1);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Settled {
    Hit,
    Compiled,
}

fn racy_window(meta: &std::fs::Metadata) -> i64 {
    if meta.ctime_nsec() == 0 {
        RACY_WINDOW_COARSE_NS
    } else {
        RACY_WINDOW_NS
    }
}

fn pyc_suffix(interpreter: &Interpreter, optimize: u8) -> String {
    if optimize == 0 {
        format!(".{}.pyc", interpreter.cache_tag)
    } else {
        format!(".{}.opt-{optimize}.pyc", interpreter.cache_tag)
    }
}

/// Creates `__pycache__` if missing; refuses one that is a symlink, so a
/// link planted in a prefix can never redirect writes elsewhere.
fn ensure_pycache(dir: &Path) -> std::result::Result<(), String> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(format!(
            "`{}` is a symlink; pycstore never writes through symlinks (remove it, or exclude the directory)",
            dir.display()
        )),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!("`{}` exists and is not a directory", dir.display())),
        Err(_) => match std::fs::create_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => ensure_pycache(dir),
            Err(e) => Err(format!("cannot create `{}`: {e}", dir.display())),
        },
    }
}

fn open_no_follow(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn read_source(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
