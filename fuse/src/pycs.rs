//! The pycs a view serves: for a source of the tree, an interpreter and an
//! optimize level, the store's compiled body behind a header made for the
//! live source, so one object serves every flavor.
//!
//! The index is RocksDB, which one process at a time may open, so a mount
//! never holds it while serving: it loads the stored bodies and the known
//! compile failures into memory at start, opens a short session only to
//! re-check a miss when another process used the index since its own last
//! session, and records what it compiled in batches from a background
//! thread. It does not hold the store lock either (that would block `gc`
//! for as long as the mount lives): it takes it shared around writing an
//! object and until the batch naming it is recorded. An object that cannot
//! be opened (`gc` evicted it) is a miss, compiled again.
//!
//! With remotes, a miss is asked of them first ([`Pycs::fill`]), one key at
//! a time on first access, with `link`'s checks ([`Remotes::accept`]); what
//! they give is stored like a compile, what the view compiles is uploaded
//! (unless read-only), and a remote that fails or does not answer within
//! its timeout is said once and left alone until a retry after its
//! cooldown finds it answering again (`mount --remote-retry`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::Errno;
use pycstore_store::compile::{Outcome, WorkerSlot};
use pycstore_store::index::{Counters, Entry, EntrySlot, Index, Writes};
use pycstore_store::key::{CompileKey, SourceDigest};
use pycstore_store::lock::LockGuard;
use pycstore_store::objects::ObjectId;
use pycstore_store::pyc::{self, Flavor, HeaderInput, HEADER_LEN};
use pycstore_store::remote::{Answer, Remotes};
use pycstore_store::resolve::{self, ObjectState};
use pycstore_store::util::now_ns;
use pycstore_store::{Interpreter, Store};

use crate::stats::MountStats;
use crate::under::{Meta, Under};
use crate::{lock, Error};

/// How often compiled pycs, use times and counters are recorded in the index.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How long before Python began writing a timestamp pyc its source must
/// have last changed for the pyc to be stored ([`Pycs::ingest`]): more than
/// Python takes to read, compile and start writing a module.
pub(crate) const TIMESTAMP_SETTLED: Duration = Duration::from_secs(1);

/// The most source digests kept by inode ([`Pycs::source`]).
const MAX_KNOWN_SOURCES: usize = 1 << 20;

/// An interpreter a view serves pycs for, with its compile workers.
pub(crate) struct Interp {
    /// What the probe said.
    pub interpreter: Interpreter,
    label: String,
    pool: Pool,
}

/// Long-lived compile workers of one interpreter, at most `max` at once.
struct Pool {
    executable: PathBuf,
    timeout: Option<Duration>,
    max: usize,
    state: Mutex<(Vec<WorkerSlot>, usize)>,
    freed: Condvar,
}

impl Pool {
    fn take(&self) -> WorkerSlot {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(slot) = state.0.pop() {
                return slot;
            }
            if state.1 < self.max {
                state.1 += 1;
                // A worker starting up imports modules; through an overlay
                // over an interpreter's own prefix those could be misses of
                // this very mount, looked up by the reader the worker is
                // starting for: the worker reads no pycs at all (and writes
                // none).
                return WorkerSlot::with_args(
                    self.executable.clone(),
                    self.timeout,
                    ["-B", "-X", "pycache_prefix=/dev/null/pycstore"]
                        .map(Into::into)
                        .to_vec(),
                );
            }
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give(&self, slot: WorkerSlot) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0.push(slot);
        self.freed.notify_all();
    }

    /// Ends the workers: the idle ones now, busy ones as their compile
    /// returns, waiting until `deadline` at most. A worker left running
    /// would keep its interpreter's files open: with the view over that
    /// interpreter's own prefix, the prefix could not be unmounted.
    fn close(&self, deadline: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let idle = std::mem::take(&mut state.0);
            state.1 -= idle.len();
            // Dropping a slot kills its worker and waits for it.
            drop(idle);
            let left = deadline.saturating_duration_since(Instant::now());
            if state.1 == 0 || left.is_zero() {
                return;
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What identifies one state of a source file: a change to any of these
/// makes a new pyc (with a new inode), never a changed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SourceState {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl SourceState {
    pub fn of(meta: &Meta) -> SourceState {
        SourceState {
            dev: meta.dev,
            ino: meta.ino,
            size: meta.size,
            mtime_ns: meta.mtime_ns,
            ctime_ns: meta.ctime_ns,
        }
    }
}

/// A source file as the view knows it: its stat, digest and source hashes.
pub(crate) struct Source {
    /// Its path relative to the tree's base.
    pub rel: PathBuf,
    /// `stat` (following a symlink).
    pub meta: Meta,
    digest: SourceDigest,
    /// `importlib.util.source_hash` for each interpreter.
    hashes: Vec<[u8; 8]>,
}

#[derive(Clone)]
struct Known {
    state: SourceState,
    digest: SourceDigest,
    hashes: Vec<[u8; 8]>,
}

/// One served pyc: a header made for the source, and the store object whose
/// bytes after the header are the body. The object stays readable while it
/// is open, even if `gc` removes it.
pub(crate) struct Served {
    pub header: [u8; HEADER_LEN],
    pub object: File,
    pub size: u64,
    /// Where the object lives in the store.
    pub path: PathBuf,
}

impl Served {
    /// Whether the store still holds this object (`gc` may have removed it;
    /// the open file stays readable for those who have it).
    pub fn in_store(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.object.metadata(), std::fs::metadata(&self.path)) {
            (Ok(open), Ok(stored)) => open.dev() == stored.dev() && open.ino() == stored.ino(),
            _ => false,
        }
    }

    /// Up to `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let end = (offset + u64::from(len)).min(self.size);
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        let mut filled = 0;
        while pos < HEADER_LEN as u64 && pos < end {
            out[filled] = self.header[pos as usize];
            pos += 1;
            filled += 1;
        }
        while filled < out.len() {
            let n = self.object.read_at(&mut out[filled..], pos)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            filled += n;
            pos += n as u64;
        }
        Ok(out)
    }
}

/// What [`Pycs::find`] knows without compiling.
pub(crate) enum Found {
    /// The store has it.
    Served(Served),
    /// The source does not compile for this interpreter.
    Absent,
    /// Nobody compiled it yet.
    Miss,
    /// The store could not be read (not a miss: compiling again would not
    /// help).
    Failed(Errno),
}

#[derive(Default)]
struct Flight {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Flight {
    fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

#[derive(Default)]
struct Pending {
    writes: Writes,
    used: HashSet<ObjectId>,
    counters: HashMap<usize, Counters>,
    /// Shared store locks taken for objects written since the last flush:
    /// `gc` waits until their entries are recorded, so it never takes them
    /// for orphans.
    guards: Vec<LockGuard>,
}

/// The settings of [`Pycs::new`].
pub(crate) struct PycsSettings<'a> {
    pub python: &'a [PathBuf],
    /// How compile workers start each interpreter of `python` (the same
    /// path, or one that does not go through the mount).
    pub workers: &'a [PathBuf],
    pub optimize: &'a [u8],
    pub flavor: Flavor,
    pub jobs: usize,
    pub timeout: Option<Duration>,
    pub compile: bool,
    /// Asked for misses before compiling; given what is compiled.
    pub remotes: Option<Arc<Remotes>>,
}

/// The store as a view sees it.
pub(crate) struct Pycs {
    store: Store,
    /// The interpreters served, in the order given.
    pub interps: Vec<Interp>,
    /// The optimize levels served.
    pub optimize: Vec<u8>,
    flavor: Flavor,
    compile: bool,
    remotes: Option<Arc<Remotes>>,
    /// Keys the remotes did not give although all answered (asked once per
    /// mount when the view does not compile; a compiled key is stored and
    /// never asked again).
    remote_missed: Mutex<HashSet<CompileKey>>,
    bodies: RwLock<HashMap<CompileKey, Entry>>,
    failures: RwLock<HashSet<CompileKey>>,
    sources: Mutex<HashMap<(u64, u64), Known>>,
    inflight: Mutex<HashMap<CompileKey, Arc<Flight>>>,
    pending: Mutex<Pending>,
    /// The index directory's mtime after this mount's last session: while it
    /// is unchanged, no other process touched the index.
    index_seen: Mutex<Option<SystemTime>>,
    recheck: Mutex<()>,
    /// Whether the warning about objects whose owner or mode changed was
    /// given (once per mount).
    warned_exposed: AtomicBool,
    /// Counters for the final report.
    pub stats: MountStats,
}

impl Pycs {
    /// Probes the interpreters and loads what the index knows, in one session.
    pub fn new(store: Store, settings: &PycsSettings<'_>) -> Result<Pycs, Error> {
        let mut index = store.index()?;
        let mut interps: Vec<Interp> = Vec::new();
        for (exe, worker) in settings.python.iter().zip(settings.workers) {
            let interpreter = Interpreter::probe(exe, Some(&mut index))?;
            if interps
                .iter()
                .any(|i| i.interpreter.cache_tag == interpreter.cache_tag)
            {
                continue;
            }
            interps.push(Interp {
                label: pycstore_store::link::counter_label(&interpreter),
                pool: Pool {
                    executable: worker.clone(),
                    timeout: settings.timeout,
                    max: settings.jobs.max(1),
                    state: Mutex::new((Vec::new(), 0)),
                    freed: Condvar::new(),
                },
                interpreter,
            });
        }
        let mut bodies = HashMap::new();
        for (key, slot, entry) in index.entries()? {
            if let (EntrySlot::Body, Some(entry)) = (slot, entry) {
                bodies.insert(key, entry);
            }
        }
        let failures: HashSet<CompileKey> = index.failure_keys()?.into_iter().collect();
        // What this session wrote (new probes) is a cache: a flush that
        // fails leaves it in the write-ahead log, and the mount goes on.
        if let Err(e) = index.close() {
            tracing::warn!("{e}");
        }
        tracing::debug!(
            "loaded {} stored bodies and {} known failures",
            bodies.len(),
            failures.len()
        );
        let mut optimize = settings.optimize.to_vec();
        optimize.sort_unstable();
        optimize.dedup();
        let pycs = Pycs {
            index_seen: Mutex::new(None),
            store,
            interps,
            optimize,
            flavor: settings.flavor,
            compile: settings.compile,
            remotes: settings.remotes.clone(),
            remote_missed: Mutex::new(HashSet::new()),
            bodies: RwLock::new(bodies),
            failures: RwLock::new(failures),
            sources: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            recheck: Mutex::new(()),
            warned_exposed: AtomicBool::new(false),
            stats: MountStats::default(),
        };
        pycs.note_index_seen();
        Ok(pycs)
    }

    /// For a file name in a pycache directory: the source stem, the
    /// interpreter and the optimize level, when it names a pyc this view
    /// serves (`STEM.TAG.pyc`, `STEM.TAG.opt-N.pyc`).
    pub fn parse_name<'n>(&self, name: &'n [u8]) -> Option<(&'n [u8], usize, u8)> {
        for (i, interp) in self.interps.iter().enumerate() {
            for &opt in &self.optimize {
                let suffix = interp.interpreter.pyc_name("", opt);
                if let Some(stem) = name.strip_suffix(suffix.as_bytes()) {
                    if !stem.is_empty() {
                        return Some((stem, i, opt));
                    }
                }
            }
        }
        None
    }

    /// Like [`Pycs::parse_name`], for any interpreter of the view and any
    /// optimize level, whether served or not (what Python may write).
    pub fn parse_any_name<'n>(&self, name: &'n [u8]) -> Option<(&'n [u8], usize, u8)> {
        for (i, interp) in self.interps.iter().enumerate() {
            for opt in 0..=2u8 {
                let suffix = interp.interpreter.pyc_name("", opt);
                if let Some(stem) = name.strip_suffix(suffix.as_bytes()) {
                    if !stem.is_empty() {
                        return Some((stem, i, opt));
                    }
                }
            }
        }
        None
    }

    /// The names of the pycs served for the source stem `stem`.
    pub fn names(&self, stem: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for interp in &self.interps {
            for &opt in &self.optimize {
                let mut name = stem.to_vec();
                name.extend_from_slice(interp.interpreter.pyc_name("", opt).as_bytes());
                out.push(name);
            }
        }
        out
    }

    /// Stats and identifies a source: its digest from the cache when the
    /// file is unchanged, else read and hashed.
    pub fn source(&self, under: &Under, rel: &Path, meta: Meta) -> Result<Source, Errno> {
        let state = SourceState::of(&meta);
        if let Some(known) = lock(&self.sources).get(&(meta.dev, meta.ino)) {
            if known.state == state {
                return Ok(Source {
                    rel: rel.to_path_buf(),
                    meta,
                    digest: known.digest,
                    hashes: known.hashes.clone(),
                });
            }
        }
        let (read_meta, bytes) = under.read(rel).map_err(Errno::from)?;
        if SourceState::of(&read_meta) != state || bytes.len() as u64 != meta.size {
            // Changed while being read: the caller's stat is already stale.
            return Err(Errno::ESTALE);
        }
        let digest = SourceDigest::of(&bytes);
        let hashes: Vec<[u8; 8]> = self
            .interps
            .iter()
            .map(|i| pyc::source_hash(i.interpreter.hash_variant, i.interpreter.magic, &bytes))
            .collect();
        // Trusted later only once settled, as `link`'s stat cache.
        if resolve::settled(meta.mtime_ns, meta.ctime_ns, now_ns()) {
            let mut sources = lock(&self.sources);
            // Bounded: files a tree's writer keeps making cannot grow it
            // without end (forgotten, a digest is taken again).
            if sources.len() >= MAX_KNOWN_SOURCES {
                *sources = HashMap::new();
            }
            sources.insert(
                (meta.dev, meta.ino),
                Known {
                    state,
                    digest,
                    hashes: hashes.clone(),
                },
            );
        }
        Ok(Source {
            rel: rel.to_path_buf(),
            meta,
            digest,
            hashes,
        })
    }

    fn key(&self, source: &Source, interp: usize, optimize: u8) -> CompileKey {
        self.interps[interp]
            .interpreter
            .compile_key(&source.digest, optimize)
    }

    /// The header of the source's pyc in this view's flavor: from the
    /// source's hash, or from the live source's mtime and size.
    fn header(&self, source: &Source, interp: usize) -> [u8; HEADER_LEN] {
        let input = match self.flavor {
            Flavor::Timestamp => HeaderInput::Stat {
                mtime: source.meta.mtime_secs(),
                size: source.meta.size,
            },
            _ => HeaderInput::Hash(source.hashes[interp]),
        };
        pyc::header(self.interps[interp].interpreter.magic, self.flavor, input)
    }

    /// Opens an entry's object to serve it, with the checks `link` makes
    /// before placing one ([`resolve::open_object`]): `Ok(None)` when it is
    /// missing, damaged or exposed (its owner or mode changed, so its bytes
    /// may have too), a miss whose compile writes it again with a fresh
    /// inode; an error when it cannot be opened for another reason (out of
    /// descriptors).
    fn open_object(&self, entry: &Entry) -> Result<Option<File>, Errno> {
        let path = || self.store.objects.path(&entry.object);
        match resolve::open_object(&self.store.objects, entry) {
            Ok(ObjectState::Good(object)) => Ok(Some(object.file)),
            Ok(ObjectState::Missing) => Ok(None),
            Ok(ObjectState::Damaged { len }) => {
                tracing::debug!(
                    "store object `{}` does not match its index entry ({len} bytes, {} expected): a miss",
                    path().display(),
                    entry.size
                );
                Ok(None)
            }
            Ok(ObjectState::Exposed(st)) => {
                if !self.warned_exposed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "store object `{}` has owner {} and mode {:o}, not what the store gave it \
                         (a `chown`/`chmod` through a hardlinked pyc?); serving a fresh compile \
                         instead of such objects (run `pycstore verify --repair` to fix the rest)",
                        path().display(),
                        st.st_uid,
                        st.st_mode & 0o7777
                    );
                }
                Ok(None)
            }
            Err(e) => {
                tracing::warn!("cannot open store object `{}`: {e}", path().display());
                Err(Errno::from(e))
            }
        }
    }

    /// The pyc of `source` for an interpreter and optimize level, if the
    /// store has it, without compiling.
    pub fn find(&self, source: &Source, interp: usize, optimize: u8) -> Found {
        self.find_counted(source, interp, optimize, true)
    }

    fn find_counted(&self, source: &Source, interp: usize, optimize: u8, hit: bool) -> Found {
        let key = self.key(source, interp, optimize);
        let entry = self
            .bodies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        if let Some(entry) = entry {
            match self.open_object(&entry) {
                Err(e) => return Found::Failed(e),
                Ok(Some(object)) => {
                    let mut pending = lock(&self.pending);
                    pending.used.insert(entry.object);
                    if hit {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        pending.counters.entry(interp).or_default().hits += 1;
                    }
                    return Found::Served(Served {
                        header: self.header(source, interp),
                        object,
                        size: entry.size,
                        path: self.store.objects.path(&entry.object),
                    });
                }
                Ok(None) => {
                    tracing::debug!(
                        "the object of `{}` cannot be served: a miss",
                        source.rel.display()
                    );
                    self.bodies
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
            }
        }
        if self
            .failures
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
        {
            return Found::Absent;
        }
        Found::Miss
    }

    /// Whether the view fills misses: compiles them, or asks remotes.
    pub fn fills_misses(&self) -> bool {
        self.compile || self.remotes.is_some()
    }

    /// The remotes asked for misses, if any.
    pub fn remotes(&self) -> Option<&Remotes> {
        self.remotes.as_deref()
    }

    /// The pyc of `source`, looked up, else compiled: from what the mount
    /// loaded, from the index when another process recorded it since, else
    /// filled by [`Pycs::fill`] (one fill per key; concurrent readers wait
    /// for it). `None` when the source does not compile.
    pub fn lookup_or_compile(
        &self,
        under: &Under,
        source: &Source,
        interp: usize,
        optimize: u8,
    ) -> Result<Option<Served>, Errno> {
        match self.find(source, interp, optimize) {
            Found::Served(s) => return Ok(Some(s)),
            Found::Absent => return Ok(None),
            Found::Failed(e) => return Err(e),
            Found::Miss if !self.fills_misses() => return Ok(None),
            Found::Miss => {}
        }
        let key = self.key(source, interp, optimize);
        if self.recheck(&key) {
            match self.find_counted(source, interp, optimize, false) {
                Found::Served(s) => return Ok(Some(s)),
                Found::Absent => return Ok(None),
                Found::Failed(e) => return Err(e),
                Found::Miss => {}
            }
        }
        let (flight, leader) = {
            let mut inflight = lock(&self.inflight);
            match inflight.get(&key) {
                Some(flight) => (Arc::clone(flight), false),
                None => {
                    let flight = Arc::new(Flight::default());
                    inflight.insert(key, Arc::clone(&flight));
                    (flight, true)
                }
            }
        };
        if leader {
            let result = self.fill(under, source, interp, optimize, &key);
            lock(&self.inflight).remove(&key);
            flight.finish();
            result?;
        } else {
            flight.wait();
        }
        match self.find_counted(source, interp, optimize, false) {
            Found::Served(s) => Ok(Some(s)),
            Found::Failed(e) => Err(e),
            Found::Absent | Found::Miss => Ok(None),
        }
    }

    /// Fills a miss the store does not have: from the remotes when they
    /// give a pyc that passes `link`'s checks against the live source
    /// ([`Remotes::accept`]), else compiled (and uploaded). What a remote
    /// brings is an object like any other, recorded with
    /// [`Pycs::store_pyc`] and served only through [`Pycs::open_object`]'s
    /// checks.
    fn fill(
        &self,
        under: &Under,
        source: &Source,
        interp: usize,
        optimize: u8,
        key: &CompileKey,
    ) -> Result<(), Errno> {
        let (meta, bytes) = under.read(&source.rel).map_err(Errno::from)?;
        if SourceState::of(&meta) != SourceState::of(&source.meta)
            || SourceDigest::of(&bytes) != source.digest
        {
            return Err(Errno::ESTALE);
        }
        if self.fetch(source, interp, key, &bytes)? {
            return Ok(());
        }
        if !self.compile {
            return Ok(());
        }
        self.compile(under, source, interp, optimize, key, &bytes)
    }

    /// Asks the remotes for `key` (of the source whose bytes are `bytes`):
    /// whether they gave a pyc that checks out, now stored.
    fn fetch(
        &self,
        source: &Source,
        interp: usize,
        key: &CompileKey,
        bytes: &[u8],
    ) -> Result<bool, Errno> {
        let Some(remotes) = &self.remotes else {
            return Ok(false);
        };
        let interpreter = &self.interps[interp].interpreter;
        if !self.travels(interp) || lock(&self.remote_missed).contains(key) {
            return Ok(false);
        }
        let (body, answered) = match remotes.fetch_one(key) {
            Answer::Fetched(fetched) => (
                remotes.accept(fetched, interpreter.magic, interpreter.hash_variant, bytes),
                true,
            ),
            Answer::Missing => (None, true),
            Answer::Unavailable => (None, false),
        };
        self.remote_warnings();
        let Some(body) = body else {
            // Not asked again unless a remote could not answer (it may,
            // after a retry).
            if !self.compile && answered {
                lock(&self.remote_missed).insert(*key);
            }
            return Ok(false);
        };
        let header = self.header(source, interp);
        let mut pyc = Vec::with_capacity(HEADER_LEN + body.body().len());
        pyc.extend_from_slice(&header);
        pyc.extend_from_slice(body.body());
        let slot = resolve::slot(self.flavor, source.meta.mtime_secs(), source.meta.size);
        self.store_pyc(key, slot, &pyc, source.meta.mode, |c| c.misses += 1, interp)?;
        self.stats.fetched.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether the pycs of an interpreter may travel to and from remotes
    /// (never those of an interpreter others can change, nor Python 3.6's).
    fn travels(&self, interp: usize) -> bool {
        let interpreter = &self.interps[interp].interpreter;
        pycstore_store::remote::eligible(interpreter.key_domain.as_ref(), interpreter.magic)
    }

    /// Gives the remotes' warnings to the log, each once.
    pub fn remote_warnings(&self) {
        if let Some(remotes) = &self.remotes {
            for message in remotes.take_warnings() {
                tracing::warn!("{message}");
            }
        }
    }

    fn compile(
        &self,
        under: &Under,
        source: &Source,
        interp: usize,
        optimize: u8,
        key: &CompileKey,
        bytes: &[u8],
    ) -> Result<(), Errno> {
        let pool = &self.interps[interp].pool;
        let started = Instant::now();
        let mut slot = pool.take();
        let outcome = slot.compile(bytes, &under.display_path(&source.rel), optimize);
        pool.give(slot);
        self.stats
            .compile_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match outcome {
            Outcome::Compiled(body) => {
                self.stats.compiled.fetch_add(1, Ordering::Relaxed);
                let header = self.header(source, interp);
                let mut pyc = Vec::with_capacity(HEADER_LEN + body.len());
                pyc.extend_from_slice(&header);
                pyc.extend_from_slice(&body);
                let slot = resolve::slot(self.flavor, source.meta.mtime_secs(), source.meta.size);
                if let Err(e) = pycstore_store::marshal::check_pyc(&pyc) {
                    if e.is_damage() {
                        tracing::warn!(
                            "the compiler's output for `{}` is not a loadable pyc: {e}",
                            source.rel.display()
                        );
                        return Err(Errno::EIO);
                    }
                }
                self.store_pyc(
                    key,
                    slot,
                    &pyc,
                    source.meta.mode,
                    |c| {
                        c.compiles += 1;
                        c.misses += 1;
                    },
                    interp,
                )?;
                if let Some(remotes) = self.remotes.as_ref().filter(|r| r.writable()) {
                    if self.travels(interp) {
                        let interpreter = &self.interps[interp].interpreter;
                        remotes.upload(
                            key,
                            interpreter.magic,
                            interpreter.hash_variant,
                            bytes,
                            &body,
                        );
                    }
                }
                Ok(())
            }
            Outcome::Rejected(message) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "`{}` does not compile for {}: {message}",
                    under.display_path(&source.rel).display(),
                    self.interps[interp].interpreter.cache_tag
                );
                self.failures
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*key);
                let mut pending = lock(&self.pending);
                pending.writes.failure(key, &message);
                let c = pending.counters.entry(interp).or_default();
                c.compiles += 1;
                c.failures += 1;
                Ok(())
            }
            Outcome::WorkerFailed(message) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "cannot compile `{}`: {message}; Python compiles it itself",
                    under.display_path(&source.rel).display()
                );
                lock(&self.pending)
                    .counters
                    .entry(interp)
                    .or_default()
                    .failures += 1;
                Ok(())
            }
        }
    }

    /// Writes a pyc as an object and records it for its key: as the body
    /// every flavor is derived from, and in its own slot.
    fn store_pyc(
        &self,
        key: &CompileKey,
        slot: EntrySlot,
        pyc: &[u8],
        source_mode: u32,
        count: impl FnOnce(&mut Counters),
        interp: usize,
    ) -> Result<(), Errno> {
        let guard = self.store.lock_shared().map_err(|e| {
            tracing::warn!("cannot lock the store: {e}");
            Errno::EIO
        })?;
        let mode = resolve::object_mode(&self.store.objects, source_mode);
        let object = self.store.objects.put_mode(pyc, mode).map_err(|e| {
            tracing::warn!("cannot write an object: {e}");
            Errno::from(e)
        })?;
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&pyc[..HEADER_LEN]);
        let entry = Entry {
            object,
            size: pyc.len() as u64,
            header,
        };
        {
            let mut pending = lock(&self.pending);
            pending.writes.entry(key, EntrySlot::Body, &entry);
            pending.writes.entry(key, slot, &entry);
            pending.used.insert(object);
            count(pending.counters.entry(interp).or_default());
            pending.guards.push(guard);
        }
        self.bodies
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*key, entry);
        Ok(())
    }

    /// Counts and reports a pyc written for the source `rel` that is not
    /// stored.
    pub fn refuse(&self, under: &Under, rel: &Path, why: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "refused the pyc written for `{}`: {why}",
            under.display_path(rel).display()
        );
    }

    /// Checks a pyc that Python wrote for the source `rel` and stores it:
    /// the magic must be the interpreter's, the flags a valid flavor, the
    /// header must match the live source (its hash, or its mtime and size),
    /// and the body must be one code object Python can load.
    ///
    /// A pyc is stored under the digest of the bytes read here, for every
    /// tree that holds them, but Python compiled what it read before. So it
    /// is stored only when the bytes cannot have changed in between: the
    /// source (every symlink and directory on its way included) is one
    /// nobody but root and the mount's owner can change, on a filesystem
    /// that is not another user's FUSE mount (whose server answers what it
    /// likes), and, for a timestamp pyc (which names its source by mtime
    /// and size only), it last changed at least [`TIMESTAMP_SETTLED`]
    /// before Python began writing the pyc (`begun`). Otherwise a user could
    /// swap in a same-size file, its mtime put back (or, for a hash-based
    /// pyc, one whose 64-bit SipHash, keyed by the public magic number,
    /// collides), and get one file's bytecode served for the other.
    pub fn ingest(
        &self,
        under: &Under,
        rel: &Path,
        interp: usize,
        optimize: u8,
        data: &[u8],
        begun: SystemTime,
    ) -> Result<(), Errno> {
        let refuse = |why: &str| {
            self.refuse(under, rel, why);
            Err(Errno::EINVAL)
        };
        let interpreter = &self.interps[interp].interpreter;
        if data.len() <= HEADER_LEN {
            return refuse("too short");
        }
        if data[..4] != interpreter.magic {
            return refuse("not the interpreter's magic number");
        }
        let flavor = match u32::from_le_bytes([data[4], data[5], data[6], data[7]]) {
            0b11 => Flavor::CheckedHash,
            0b01 => Flavor::UncheckedHash,
            0b00 => Flavor::Timestamp,
            _ => return refuse("invalid flags"),
        };
        let (meta, bytes) = under.read(rel).map_err(Errno::from)?;
        let expected = match flavor {
            Flavor::Timestamp => HeaderInput::Stat {
                mtime: meta.mtime_secs(),
                size: meta.size,
            },
            _ => HeaderInput::Hash(pyc::source_hash(
                interpreter.hash_variant,
                interpreter.magic,
                &bytes,
            )),
        };
        if data[..HEADER_LEN] != pyc::header(interpreter.magic, flavor, expected) {
            return refuse("its header does not match the source");
        }
        // Stored for every tree holding the source's bytes, a pyc Python
        // wrote must be of those bytes: no one else may have been able to
        // change them while Python compiled them.
        let path = under.display_path(rel);
        if !under.may_enter(meta.dev) {
            return refuse(
                "the source is on a FUSE filesystem of another user, whose server says \
                 what its files are; pycs the mount compiles are stored",
            );
        }
        if let Some(doubt) = pycstore_store::python_trust::others_can_change(&path) {
            return refuse(&format!(
                "another user can change the source ({doubt}), and with it what Python \
                 compiled; pycs the mount compiles are stored"
            ));
        }
        if flavor == Flavor::Timestamp {
            let changed = UNIX_EPOCH + Duration::from_nanos(meta.ctime_ns.max(0) as u64);
            if changed + TIMESTAMP_SETTLED > begun {
                return refuse(
                    "its source changed less than a second before Python wrote it, so \
                     the timestamp pyc may hold other bytes; the next one written is stored",
                );
            }
        }
        // One whole code object Python can load, nothing after it; a pyc of
        // a Python whose format the checker does not know is not stored.
        if let Err(e) = pycstore_store::marshal::check_pyc(data) {
            return refuse(&format!("its body is not one loadable code object ({e})"));
        }
        let key = interpreter.compile_key(&SourceDigest::of(&bytes), optimize);
        let known = self
            .bodies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        if known.is_some_and(|entry| matches!(self.open_object(&entry), Ok(Some(_)))) {
            return Ok(());
        }
        let slot = resolve::slot(flavor, meta.mtime_secs(), meta.size);
        self.store_pyc(&key, slot, data, meta.mode, |c| c.misses += 1, interp)?;
        self.stats.ingested.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether another process recorded `key` (compiled or failed) since
    /// this mount last looked: one short session, only when the index
    /// changed since this mount's last one.
    fn recheck(&self, key: &CompileKey) -> bool {
        let _one = lock(&self.recheck);
        let now = index_mtime(&self.store.index_path());
        if now.is_some() && now == *lock(&self.index_seen) {
            return false;
        }
        let found = (|| -> pycstore_store::Result<bool> {
            let index = self.store.index()?;
            if let Some(entry) = index.entry(key, EntrySlot::Body)? {
                self.bodies
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*key, entry);
                return Ok(true);
            }
            if index.failure(key)?.is_some() {
                self.failures
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*key);
                return Ok(true);
            }
            Ok(false)
        })();
        self.note_index_seen();
        found.unwrap_or_else(|e| {
            tracing::debug!("cannot re-check a miss in the index: {e}");
            false
        })
    }

    /// Ends every compile worker, once the view is gone; a compile still
    /// running gets `grace` to finish.
    pub fn stop_workers(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for interp in &self.interps {
            interp.pool.close(deadline);
        }
    }

    fn note_index_seen(&self) {
        *lock(&self.index_seen) = index_mtime(&self.store.index_path());
    }

    /// Records what was compiled, used and counted since the last flush, in
    /// one short index session.
    pub fn flush(&self) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        let Pending {
            mut writes,
            used,
            counters,
            guards,
        } = pending;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for object in &used {
            writes.used(object, now);
        }
        for (interp, c) in counters {
            writes.count(&self.interps[interp].label, c);
        }
        self.remote_warnings();
        if writes.is_empty() && !self.remotes_to_record() {
            return;
        }
        let result = self.store.index().and_then(|mut index: Index| {
            index.apply(writes)?;
            if let Some(remotes) = &self.remotes {
                remotes.record(&mut index)?;
            }
            index.close()
        });
        if let Err(e) = result {
            tracing::warn!("cannot record what the mount compiled in the index: {e}");
        }
        self.note_index_seen();
        drop(guards);
    }
}

impl Pycs {
    /// Whether the remotes did anything not yet recorded in the index.
    fn remotes_to_record(&self) -> bool {
        self.remotes.as_ref().is_some_and(|r| r.unrecorded())
    }
}

fn index_mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every read of a served pyc, at any offset and length, is the header
    /// made for the source followed by the object's body: never a mix.
    #[test]
    fn served_reads_are_header_then_body() {
        let path = std::env::temp_dir().join(format!("pycstore-served-{}", std::process::id()));
        let mut object = vec![0xAAu8; HEADER_LEN];
        object.extend((0..300u32).map(|i| i as u8));
        std::fs::write(&path, &object).unwrap();
        let served = Served {
            header: [7u8; HEADER_LEN],
            object: File::open(&path).unwrap(),
            size: object.len() as u64,
            path: path.clone(),
        };
        let mut want = vec![7u8; HEADER_LEN];
        want.extend_from_slice(&object[HEADER_LEN..]);
        for offset in [0u64, 1, 15, 16, 17, 200, 315, 316, 400] {
            for len in [0u32, 1, 15, 16, 100, 4096] {
                let got = served.read(offset, len).unwrap();
                let start = (offset as usize).min(want.len());
                let end = (start + len as usize).min(want.len());
                assert_eq!(got, &want[start..end], "offset {offset} len {len}");
            }
        }
        assert!(served.in_store());
        std::fs::remove_file(&path).unwrap();
        assert!(!served.in_store());
        assert_eq!(served.read(16, 4).unwrap(), &want[16..20]);
    }
}
