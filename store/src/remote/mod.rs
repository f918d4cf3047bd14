//! The remote tier: stores of pycs shared between machines, behind the local
//! store.
//!
//! The local store stays the first level. `link` sends only its local
//! misses here ([`Remotes::fetch_misses`]): many requests in flight at
//! once on a small tokio runtime this module owns (the rest of the crate
//! stays synchronous), each remote asked in the order given. A FUSE view
//! asks for one miss at a time, on first access ([`Remotes::fetch_one`]),
//! and `status` only asks which misses a remote could give
//! ([`Remotes::available`]), fetching no object stored apart. What comes
//! back is checked ([`format`](mod@format) for the remote's own consistency,
//! [`Remotes::accept`] against the local source) and then stored like a
//! compile result, so the next `link` on the machine never asks again.
//! Objects compiled locally are uploaded in the background
//! ([`Remotes::upload`]); `link` waits for them only at its end, at most
//! the request timeout.
//!
//! Nothing a remote does fails a run: a remote that errors, times out or
//! refuses credentials is warned about once, with the reason, and left
//! alone: for the rest of the run (`link`, `status`, `push`), or, in a
//! process that lives long (a mount, [`Settings::retry_after`]), until a
//! request made in the background after a cooldown succeeds; a remote that
//! returns something that does not check out has it rejected, counted and
//! said once, and the pyc is compiled locally. Storage goes through OpenDAL
//! (S3, WebDAV/HTTP, a directory) and, for Redis, a pipelined connection of
//! its own (`redis_client`); [`format`](mod@format) draws what a remote holds.

pub mod config;
pub mod format;
pub mod keys;
pub mod push;
mod redis_client;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opendal::{ErrorKind, Operator};
use serde::{Deserialize, Serialize};

pub use config::{ConfigError, Requested, Settings};
use config::{Kind, RemoteSpec};
use format::{Rejection, RemoteEntry};

use crate::index::{Family, Index, Writes};
use crate::key::CompileKey;
use crate::objects::ObjectId;
use crate::pyc::{self, Flavor, HashVariant, HeaderInput, HEADER_LEN};

/// The prefix of a remote's counters in the index's `counters` family.
pub const COUNTER_PREFIX: &str = "remote\0";

/// What one remote did (in one run, or since `stats --zero`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCounters {
    /// pycs fetched and accepted.
    pub hits: u64,
    /// Keys the remote did not have.
    pub misses: u64,
    /// Objects uploaded (with their entries).
    pub uploads: u64,
    /// Requests made (reads and writes).
    pub requests: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Requests that failed (the remote was then left alone for the run,
    /// or until a retry succeeds).
    pub errors: u64,
    /// Entries or objects rejected by the checks.
    pub rejected: u64,
}

impl std::ops::AddAssign for RemoteCounters {
    fn add_assign(&mut self, o: RemoteCounters) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.uploads += o.uploads;
        self.requests += o.requests;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.errors += o.errors;
        self.rejected += o.rejected;
    }
}

impl RemoteCounters {
    /// What was counted since `earlier` (a snapshot of the same counters).
    fn since(self, earlier: RemoteCounters) -> RemoteCounters {
        RemoteCounters {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            uploads: self.uploads.saturating_sub(earlier.uploads),
            requests: self.requests.saturating_sub(earlier.requests),
            bytes_in: self.bytes_in.saturating_sub(earlier.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(earlier.bytes_out),
            errors: self.errors.saturating_sub(earlier.errors),
            rejected: self.rejected.saturating_sub(earlier.rejected),
        }
    }
}

#[derive(Default)]
struct AtomicCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    uploads: AtomicU64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: AtomicU64,
    rejected: AtomicU64,
}

impl AtomicCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RemoteCounters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RemoteCounters {
            hits: l(&self.hits),
            misses: l(&self.misses),
            uploads: l(&self.uploads),
            requests: l(&self.requests),
            bytes_in: l(&self.bytes_in),
            bytes_out: l(&self.bytes_out),
            errors: l(&self.errors),
            rejected: l(&self.rejected),
        }
    }
}

/// One remote's counters in a report.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteReport {
    /// The remote's URL, without credentials.
    pub remote: String,
    /// What it did.
    #[serde(flatten)]
    pub counters: RemoteCounters,
    /// Why it is left alone, if it is (the first error of the outage).
    pub disabled: Option<String>,
}

/// How a remote's records are read.
enum Via {
    /// Redis, reached without OpenDAL, for reads and writes (`op` still
    /// serves the listing of [`Remotes::raw_list`]).
    Redis(Box<redis_client::RedisClient>),
    /// The directory of a `file://` remote, read and written without
    /// OpenDAL, never through a symlink ([`read_file`], [`write_file`]).
    File(std::path::PathBuf),
    /// OpenDAL; `http`: an `http://` or `https://` remote, whose 403 is
    /// about one name ([`read_capped`]).
    OpenDal { http: bool },
}

struct Remote {
    label: String,
    op: Operator,
    /// How records are read (and, for Redis, written).
    via: Via,
    /// Host and port to reach before the first request (network remotes).
    address: Option<(String, u16)>,
    /// Whether the address answered: checked on first use, and again by
    /// each retry after an outage (a new cell).
    reachable: Mutex<Arc<tokio::sync::OnceCell<Result<(), String>>>>,
    counters: AtomicCounters,
    /// The counters as last added to the store's ([`Remotes::record`]).
    recorded: Mutex<RemoteCounters>,
    /// The first error of the outage under way, if any: while there is
    /// one, the remote is left alone (`off`).
    disabled: Mutex<Option<String>>,
    off: AtomicBool,
    /// When a remote left alone is tried again ([`Settings::retry_after`]).
    retry: Mutex<Retry>,
    warned_reject: AtomicBool,
}

/// The retries of a remote left alone.
#[derive(Default)]
struct Retry {
    /// When the next retry is due; `None` while the remote is in use, or
    /// when it is never retried.
    at: Option<Instant>,
    /// A retry is under way.
    trying: bool,
}

/// What the remotes said about one key ([`Remotes::fetch_one`]).
#[derive(Debug)]
pub enum Answer {
    /// A pyc consistent with its name and entry, still to be checked
    /// against the local source ([`Remotes::accept`]).
    Fetched(Fetched),
    /// Every remote was asked and none gave a pyc (or what one gave was
    /// rejected): asking again would change nothing.
    Missing,
    /// A remote that may have it could not be asked (left alone after a
    /// failure, or failing now): asking again later may give it.
    Unavailable,
}

struct Shared {
    remotes: Vec<Remote>,
    settings: Settings,
    secrets: Vec<String>,
    warnings: Mutex<Vec<String>>,
    pending_uploads: AtomicU64,
    /// The read budgets, in KiB ([`READ_BUDGET`]): entries and bundles,
    /// objects stored apart.
    budget: [Arc<tokio::sync::Semaphore>; 2],
    /// The budget of fetched pycs, in KiB ([`PYC_BUDGET`]).
    held: Arc<tokio::sync::Semaphore>,
}

/// A pyc a remote returned, consistent with its name and entry; still to
/// be checked against the local source ([`Remotes::accept`]).
pub struct Fetched {
    remote: usize,
    pyc: Vec<u8>,
    /// The pyc's blake3, checked.
    object: ObjectId,
    /// The entry it came in, when fetched by its own name (for a bundle
    /// this run may write).
    record: Option<Vec<u8>>,
    /// The pyc's share of [`PYC_BUDGET`], given back when it is dropped.
    _held: tokio::sync::OwnedSemaphorePermit,
}

impl Fetched {
    /// The entry it came in, if kept, for [`Remotes::bundle_part`].
    pub fn take_record(&mut self) -> Option<BundleRecord> {
        let bytes = self.record.take()?;
        Some(BundleRecord {
            from: Some(self.remote),
            bytes,
        })
    }
}

/// An entry for a bundle this run writes, and where it came from: a
/// bundle written to a remote carries what this run compiled and what it
/// fetched from that remote, never another remote's entries.
#[derive(Debug)]
pub struct BundleRecord {
    /// The remote it was fetched from; `None`: compiled here.
    from: Option<usize>,
    bytes: Vec<u8>,
}

/// A fetched pyc that passed every check ([`Remotes::accept`]).
pub struct Accepted {
    /// The whole pyc: a hash-based header with the interpreter's magic and
    /// the local source's hash, then the body.
    pub(crate) pyc: Vec<u8>,
    /// Its blake3, checked (the store writes the pyc under it unhashed).
    pub(crate) object: ObjectId,
    /// The pyc's share of [`PYC_BUDGET`], still held.
    _held: tokio::sync::OwnedSemaphorePermit,
}

impl Accepted {
    /// The code object, after the header.
    pub fn body(&self) -> &[u8] {
        &self.pyc[HEADER_LEN..]
    }
}

/// What asking one remote for one entry gave.
enum Step {
    Got(Fetched),
    /// Not there.
    Missing,
    /// There, and rejected (counted and said).
    Rejected,
    /// The request failed (the remote is now left alone).
    Failed,
}

/// The kinds of record read from a remote, each with its largest valid
/// size and its read budget.
#[derive(Clone, Copy, Debug)]
enum Record {
    Entry,
    Bundle,
    /// An object stored apart from its entry (a large pyc).
    Object,
}

impl Record {
    /// The most bytes a valid record of this kind holds (an object: the
    /// largest; each is read up to what its entry's size allows).
    fn limit(self) -> usize {
        match self {
            Record::Entry => format::ENTRY_MAX,
            Record::Bundle => format::BUNDLE_MAX,
            Record::Object => format::object_limit(format::MAX_OBJECT),
        }
    }

    /// Which of [`Shared::budget`] its reads take from.
    fn budget(self) -> usize {
        match self {
            Record::Entry | Record::Bundle => 0,
            Record::Object => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Record::Entry => "an entry",
            Record::Bundle => "a bundle",
            Record::Object => "an object",
        }
    }
}

/// The bytes in flight or being checked, at most, per budget: one for
/// entries and bundles, one for objects stored apart. Each read takes the
/// largest size of its kind from its budget before it starts, gives back
/// what it did not need once read, and the rest when its bytes are
/// dropped, so what hostile writers store (records of gigabytes, 128 at a
/// time) costs at most this much memory. Objects
/// have a budget of their own: a read holding an entry or a bundle may wait
/// for an object's, never the other way round.
const READ_BUDGET: usize = 256 << 20;

const _: () = assert!(
    format::ENTRY_MAX < READ_BUDGET && format::BUNDLE_MAX + (1 << 20) <= READ_BUDGET,
    "a read never waits for more than its budget holds"
);

/// The most bytes of fetched pycs held at once, decompressed: each takes
/// its size from this budget before it is decompressed, and gives it back
/// when dropped (stored, rejected or not needed). A record read counts
/// against [`READ_BUDGET`] compressed, and 10 KB of zstd can hold a
/// 64 MiB pyc: without this, a writer without a trusted key could store
/// such entries for the sources a reader links and have its fetches
/// outrun the compile threads that check and store them until memory ran
/// out. A bundle takes what all its pycs need at once, so fetches never
/// hold part of this while waiting for more.
const PYC_BUDGET: usize = 256 << 20;

const _: () = assert!(
    format::BUNDLE_PYCS_MAX as usize <= PYC_BUDGET && format::MAX_OBJECT as usize <= PYC_BUDGET,
    "a fetch never waits for more than the budget holds"
);

/// KiB (rounded up) of a pyc of `size` bytes, as [`PYC_BUDGET`] counts:
/// no more than the largest valid pyc (a larger one is rejected unread).
fn pyc_kib(size: u64) -> u32 {
    size.min(format::MAX_OBJECT).div_ceil(1024) as u32
}

/// What reading a name on a remote gave.
enum Read {
    Found(Body),
    Missing,
    /// Not a record to check: longer than any valid one of its kind (cut
    /// off), or no record at all (a Redis list, a directory or a FIFO in a
    /// file remote). Rejected for this name; the remote stays in use.
    Rejected(Rejection),
    Failed(String),
}

/// What one read of a name gave, before any check.
enum Fetch {
    /// At most the limit and one more byte.
    Bytes(Vec<u8>),
    Missing,
    /// Something there that is not a record, and what it is.
    NotARecord(String),
}

/// The bytes of a record read, holding their share of the read budget.
struct Body {
    bytes: Vec<u8>,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads `path` with `op`, streaming, and stops once it holds more than
/// `limit` bytes (keeping `limit + 1`). An empty record is none. Counts the
/// bytes received. (Not a ranged request: OpenDAL takes a range past the
/// end of a record for an error.)
///
/// An HTTP server's 403 (a directory there, a file it may not read) is
/// about that one name, when `http`: a refused credential is a 401. (An S3
/// server's 403 is a refused signature or key.)
async fn read_capped(
    op: &Operator,
    path: &str,
    limit: usize,
    counters: &AtomicCounters,
    http: bool,
) -> Result<Fetch, String> {
    use futures::TryStreamExt;
    let missing_or = |e: opendal::Error| match e.kind() {
        ErrorKind::NotFound => Ok(Fetch::Missing),
        ErrorKind::IsADirectory => Ok(Fetch::NotARecord("a directory".into())),
        ErrorKind::PermissionDenied if http => Ok(Fetch::NotARecord(
            "something the server refuses to serve (HTTP 403)".into(),
        )),
        _ => Err(describe(&e)),
    };
    let stream = async { op.reader(path).await?.into_stream(..).await }.await;
    let mut stream = match stream {
        Ok(stream) => stream,
        Err(e) => return missing_or(e),
    };
    let mut bytes = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(None) if bytes.is_empty() => return Ok(Fetch::Missing),
            Ok(None) => return Ok(Fetch::Bytes(bytes)),
            Ok(Some(buffer)) => {
                AtomicCounters::add(&counters.bytes_in, buffer.len() as u64);
                for chunk in buffer {
                    let room = limit + 1 - bytes.len();
                    bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if bytes.len() > limit {
                        return Ok(Fetch::Bytes(bytes));
                    }
                }
            }
            Err(e) => return missing_or(e),
        }
    }
}

/// The directory of the record `path` in the `file://` remote at `root`,
/// and the record's name: reached beneath `root` without following any
/// symlink (made, with every directory above it, when `create`), so that
/// whoever else can write the shared directory cannot turn a read or a
/// write of this process to a file elsewhere.
fn file_dir(
    root: &std::path::Path,
    path: &str,
    create: bool,
) -> std::io::Result<(std::os::fd::OwnedFd, std::ffi::OsString)> {
    use std::os::fd::AsFd;
    use std::path::Path;
    let path = Path::new(path);
    let name = path
        .file_name()
        .expect("a record has a name")
        .to_os_string();
    let parent = path.parent().unwrap_or(Path::new(""));
    let root = crate::tree::open_root(root)?;
    if !create {
        return Ok((
            crate::tree::open_listable_beneath(root.as_fd(), parent)?,
            name,
        ));
    }
    let mut dir = root;
    for component in parent.components() {
        match rustix::fs::mkdirat(
            &dir,
            component.as_os_str(),
            rustix::fs::Mode::from_raw_mode(0o777),
        ) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        dir = crate::tree::open_dir(dir.as_fd(), component.as_os_str())?;
    }
    Ok((dir, name))
}

/// Reads the record `path` of the `file://` remote at `root`: at most
/// `limit + 1` bytes, only from a regular file, reached without following
/// a symlink (see [`file_dir`]). A FIFO or a device there would block a
/// reader, or feed it without end; a symlink would read a file elsewhere.
/// An empty file is no record. (OpenDAL's file service follows symlinks
/// and opens whatever is there.)
fn read_file(root: &std::path::Path, path: &str, limit: usize) -> Result<Fetch, String> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read as _;
    let not_a_record = |what: &str| Ok(Fetch::NotARecord(what.to_string()));
    let opened = file_dir(root, path, false).and_then(|(dir, name)| {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        Ok(rustix::fs::openat(&dir, &name, flags, Mode::empty())?)
    });
    let file = match opened {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            return match (e.kind(), e.raw_os_error()) {
                (std::io::ErrorKind::NotFound, _) => Ok(Fetch::Missing),
                (_, Some(libc::ELOOP | libc::EXDEV)) => not_a_record("a symlink"),
                (_, Some(libc::ENOTDIR)) => not_a_record("a file where a directory belongs"),
                (_, Some(libc::EISDIR)) => not_a_record("a directory"),
                _ => Err(format!("cannot read `{path}` in `{}`: {e}", root.display())),
            }
        }
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return not_a_record("a directory");
    }
    if !meta.is_file() {
        return not_a_record("a special file (a FIFO, socket or device)");
    }
    let mut bytes = Vec::with_capacity((meta.len() as usize).min(limit + 1));
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{path}` in `{}`: {e}", root.display()))?;
    Ok(if bytes.is_empty() {
        Fetch::Missing
    } else {
        Fetch::Bytes(bytes)
    })
}

/// Writes the record `path` of the `file://` remote at `root` whole: a new
/// temp file beside it (exclusive, never following a symlink), renamed
/// over it, in directories reached without following any (see
/// [`file_dir`]).
fn write_file(root: &std::path::Path, path: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::fd::AsFd;
    let (dir, name) = file_dir(root, path, true)?;
    let (temp, fd) = crate::tree::create_temp(dir.as_fd(), 0o666)?;
    let written = std::fs::File::from(fd)
        .write_all(bytes)
        .and_then(|()| Ok(rustix::fs::renameat(&dir, &temp, &dir, &name)?));
    if written.is_err() {
        let _ = crate::tree::remove(dir.as_fd(), &temp);
    }
    written
}

/// The misses of consecutive directories ([`Bundler`]), sent together to
/// [`Remotes::fetch_misses`] so that they can come in one bundle.
pub struct MissGroup<T> {
    /// Their bundle ([`format::bundle_id`] of the compile keys of all the
    /// directories' pycs), or `None` to ask for each miss by its own name.
    pub bundle: Option<[u8; 32]>,
    /// The misses.
    pub misses: Vec<T>,
}

/// Gathers the misses of consecutive directories (in walk order) into
/// groups, each asked for as one bundle: a group ends after a directory
/// whose own compile keys hash to a value 1 in [`DIRS_PER_BUNDLE`] does
/// (content-defined, as chunkers cut files: every machine walking the
/// same files cuts in the same places, and a change in one directory
/// changes only its own bundle, and a neighbour's at most), or once it
/// holds [`MAX_BUNDLE_KEYS`]. A bundle is named after the keys of every
/// pyc of its directories, hits included, so the name does not depend on
/// what the local store holds.
#[derive(Debug)]
pub struct Bundler<T> {
    keys: Vec<CompileKey>,
    misses: Vec<T>,
}

impl<T> Default for Bundler<T> {
    fn default() -> Self {
        Bundler {
            keys: Vec::new(),
            misses: Vec::new(),
        }
    }
}

/// One directory in this many ends a bundle, on average.
pub const DIRS_PER_BUNDLE: u8 = 8;

/// A bundle ends once it names this many pycs (a directory is never cut).
pub const MAX_BUNDLE_KEYS: usize = 512;

impl<T> Bundler<T> {
    /// Adds the next directory: the compile keys of all its pycs that may
    /// travel, and its misses. Returns a group to ask for when this
    /// directory ends one that holds misses.
    pub fn add(&mut self, mut keys: Vec<CompileKey>, misses: Vec<T>) -> Option<MissGroup<T>> {
        let cut = format::bundle_id(&mut keys)[0].is_multiple_of(DIRS_PER_BUNDLE);
        self.keys.extend(keys);
        self.misses.extend(misses);
        if cut || self.keys.len() >= MAX_BUNDLE_KEYS {
            self.finish()
        } else {
            None
        }
    }

    /// Ends the group under way: returned if it holds misses.
    pub fn finish(&mut self) -> Option<MissGroup<T>> {
        let mut keys = std::mem::take(&mut self.keys);
        let misses = std::mem::take(&mut self.misses);
        if misses.is_empty() {
            return None;
        }
        let bundle = (keys.len() > 1).then(|| format::bundle_id(&mut keys));
        Some(MissGroup { bundle, misses })
    }
}

/// A bundle this run writes: the entries of a directory's misses, each
/// given by [`Remotes::bundle_part`] once its miss is settled; uploaded
/// when the last one is.
pub struct BundleUpload {
    id: [u8; 32],
    remaining: AtomicUsize,
    records: Mutex<Vec<BundleRecord>>,
}

impl std::fmt::Debug for BundleUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BundleUpload({} remaining)",
            self.remaining.load(Ordering::Relaxed)
        )
    }
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fetched({} bytes)", self.pyc.len())
    }
}

/// The remotes of one process, with the runtime their requests run on.
pub struct Remotes {
    shared: Arc<Shared>,
    /// Shut down without waiting on drop ([`Remotes::drop`]).
    runtime: std::mem::ManuallyDrop<tokio::runtime::Runtime>,
    semaphore: Arc<tokio::sync::Semaphore>,
}

impl Drop for Remotes {
    /// Leaves whatever is still under way (uploads past [`Remotes::finish`]'s
    /// wait; a read blocked in the kernel, on a hung network filesystem)
    /// behind, instead of waiting for it: the process is done with them.
    fn drop(&mut self) {
        // SAFETY: `runtime` is not used after this, and taken only here.
        unsafe { std::mem::ManuallyDrop::take(&mut self.runtime) }.shutdown_background();
    }
}

impl std::fmt::Debug for Remotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remotes")
            .field("settings", &self.shared.settings)
            .finish()
    }
}

/// What a request that failed in a way the storage calls temporary (an
/// S3 server's 503 "slow down", a 500, a dropped connection) gets: up to
/// three more tries, 50 ms to 1 s apart, as S3's own clients do, within
/// the request's timeout. A server under a burst of uploads answers 503 to
/// some: without a retry, one of them left the remote alone for the rest
/// of the run.
fn retries() -> opendal::layers::RetryLayer<impl opendal::layers::RetryInterceptor> {
    opendal::layers::RetryLayer::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(3)
        .with_jitter()
        .with_notify(|event: opendal::layers::RetryEvent<'_>| {
            tracing::debug!(
                "retrying a {:?} after {:.2}s (try {}): {}",
                event.op,
                event.retry_after.as_secs_f64(),
                event.attempt,
                event.err.kind()
            );
        })
}

fn operator(spec: &RemoteSpec) -> opendal::Result<Operator> {
    use opendal::services;
    Ok(match &spec.kind {
        Kind::S3 {
            bucket,
            root,
            endpoint,
            region,
            access_key,
            secret_key,
            session_token,
        } => {
            let mut b = services::S3::default()
                .bucket(bucket)
                .root(&format!("/{root}"))
                .region(region)
                .access_key_id(access_key)
                .secret_access_key(secret_key)
                .disable_config_load();
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let Some(t) = session_token {
                b = b.session_token(t);
            }
            Operator::new(b)?
        }
        Kind::Redis {
            endpoint,
            username,
            password,
            db,
        } => {
            // Used only by the raw helpers below: requests go through
            // `redis_client`.
            let mut b = services::Redis::default()
                .endpoint(endpoint)
                .db(*db)
                .root("/");
            if let Some(u) = username {
                b = b.username(u);
            }
            if let Some(p) = password {
                b = b.password(p);
            }
            Operator::new(b)?
        }
        Kind::Http {
            endpoint,
            root,
            token,
            user,
            password,
        } => {
            let mut b = services::Webdav::default()
                .endpoint(endpoint)
                .root(&format!("/{root}"))
                .disable_create_dir(true);
            if let Some(t) = token {
                b = b.token(t);
            }
            if let Some(u) = user {
                b = b.username(u);
            }
            if let Some(p) = password {
                b = b.password(p);
            }
            Operator::new(b)?
        }
        Kind::File { root } => {
            let root = root.to_string_lossy();
            let tmp = format!("{}/{}/.tmp", root.trim_end_matches('/'), format::LAYOUT_DIR);
            Operator::new(services::Fs::default().root(&root).atomic_write_dir(&tmp))?
        }
    })
}

/// Which pycs may travel: those of interpreters whose keys are the common
/// ones (never an interpreter others can change) and whose pycs have a
/// hash-based header (3.7 and later).
pub fn eligible(key_domain: Option<&[u8; 32]>, magic: [u8; 4]) -> bool {
    key_domain.is_none()
        && crate::marshal::PycFormat::from_magic(magic).is_none_or(|f| f.header_len() == HEADER_LEN)
}

impl Remotes {
    /// Connects nothing yet: builds a client per remote and the runtime.
    pub fn new(settings: Settings) -> Result<Remotes, ConfigError> {
        opendal::install_default();
        let mut secrets = Vec::new();
        let mut remotes = Vec::new();
        for spec in &settings.remotes {
            secrets.extend(spec.secrets());
            let cannot = |e: &dyn std::fmt::Display| {
                ConfigError(format!("cannot use remote `{}`: {e}", spec.label))
            };
            let op = operator(spec).map_err(|e| cannot(&e))?.layer(retries());
            let via = match &spec.kind {
                Kind::Redis {
                    endpoint,
                    username,
                    password,
                    db,
                } => Via::Redis(Box::new(
                    redis_client::RedisClient::new(
                        endpoint,
                        username.as_deref(),
                        password.as_deref(),
                        *db,
                        settings.timeout,
                    )
                    .map_err(|e| cannot(&e))?,
                )),
                Kind::File { root } => Via::File(root.clone()),
                Kind::Http { .. } => Via::OpenDal { http: true },
                Kind::S3 { .. } => Via::OpenDal { http: false },
            };
            remotes.push(Remote {
                label: spec.label.clone(),
                op,
                via,
                address: spec.address(),
                reachable: Mutex::new(Arc::new(tokio::sync::OnceCell::new())),
                counters: AtomicCounters::default(),
                recorded: Mutex::new(RemoteCounters::default()),
                disabled: Mutex::new(None),
                off: AtomicBool::new(false),
                retry: Mutex::new(Retry::default()),
                warned_reject: AtomicBool::new(false),
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pycstore-remote")
            .enable_all()
            .build()
            .map_err(|e| ConfigError(format!("cannot start the remote client: {e}")))?;
        let semaphore = Arc::new(tokio::sync::Semaphore::new(settings.concurrency));
        // Redact the longest secrets first, so no part of one is left.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(Remotes {
            shared: Arc::new(Shared {
                remotes,
                settings,
                secrets,
                warnings: Mutex::new(Vec::new()),
                pending_uploads: AtomicU64::new(0),
                budget: [0, 1].map(|_| Arc::new(tokio::sync::Semaphore::new(READ_BUDGET >> 10))),
                held: Arc::new(tokio::sync::Semaphore::new(PYC_BUDGET >> 10)),
            }),
            runtime: std::mem::ManuallyDrop::new(runtime),
            semaphore,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Whether anything will be uploaded.
    pub fn writable(&self) -> bool {
        !self.shared.settings.read_only
    }

    /// Warnings gathered since the last call, each said once.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *crate::util::lock(&self.shared.warnings))
    }

    /// For each group of misses received on `wanted` (until it closes),
    /// asks the remotes, many at a time, and hands each miss to `done` with
    /// what was fetched, or `None` (then it is compiled), and the bundle
    /// this run writes for its group, if any (the caller gives it the
    /// miss's entry with [`Remotes::bundle_part`] once the miss is
    /// settled). A group with a bundle asks for it first, and for each miss
    /// it did not answer by its own name. `key` gives the compile key of a
    /// miss that may travel, `None` for one that must not. Returns when
    /// every miss was handed on.
    pub fn fetch_misses<T: Send + 'static>(
        &self,
        wanted: crossbeam_channel::Receiver<MissGroup<T>>,
        key: impl Fn(&T) -> Option<CompileKey>,
        done: impl Fn(T, Option<Fetched>, Option<Arc<BundleUpload>>) + Send + Sync + 'static,
    ) {
        let done = Arc::new(done);
        let mut tasks = Vec::new();
        for group in wanted {
            let mut misses = Vec::with_capacity(group.misses.len());
            for miss in group.misses {
                match key(&miss).filter(|_| self.shared.any_on()) {
                    Some(k) => misses.push((k, miss)),
                    None => done(miss, None, None),
                }
            }
            if misses.is_empty() {
                continue;
            }
            let permit = self
                .runtime
                .block_on(Arc::clone(&self.semaphore).acquire_owned())
                .expect("the semaphore is never closed");
            let shared = Arc::clone(&self.shared);
            let semaphore = Arc::clone(&self.semaphore);
            let done = Arc::clone(&done);
            let bundle = group.bundle.filter(|_| misses.len() > 1);
            tasks.push(self.runtime.spawn(async move {
                let Some(id) = bundle else {
                    for (k, miss) in misses {
                        let (fetched, _) = shared.fetch(&k).await;
                        done(miss, fetched, None);
                    }
                    drop(permit);
                    return;
                };
                let keys: Vec<CompileKey> = misses.iter().map(|(k, _)| *k).collect();
                let (got, write) = shared.fetch_bundle(&id, &keys).await;
                // The permit is given back before the misses the bundle did
                // not answer each take one: a group never waits for a
                // permit while it holds one.
                drop(permit);
                let upload = write.then(|| {
                    Arc::new(BundleUpload {
                        id,
                        remaining: AtomicUsize::new(misses.len()),
                        records: Mutex::new(Vec::with_capacity(misses.len())),
                    })
                });
                let mut rest = tokio::task::JoinSet::new();
                for ((k, miss), fetched) in misses.into_iter().zip(got) {
                    let upload = upload.clone();
                    if fetched.is_some() {
                        done(miss, fetched, upload);
                        continue;
                    }
                    let (shared, semaphore, done) = (
                        Arc::clone(&shared),
                        Arc::clone(&semaphore),
                        Arc::clone(&done),
                    );
                    rest.spawn(async move {
                        let fetched = match semaphore.acquire_owned().await {
                            Ok(_permit) => shared.fetch(&k).await.0,
                            Err(_) => None,
                        };
                        done(miss, fetched, upload);
                    });
                }
                while rest.join_next().await.is_some() {}
            }));
        }
        self.runtime.block_on(async {
            for task in tasks {
                let _ = task.await;
            }
        });
    }

    /// Gives `bundle` the entry of one of its misses (`None` when the miss
    /// gave no pyc to share); the last part uploads the bundle to every
    /// writable remote, in the background, if it holds any entry.
    pub fn bundle_part(&self, bundle: &BundleUpload, record: Option<BundleRecord>) {
        let mut records = crate::util::lock(&bundle.records);
        records.extend(record);
        if bundle.remaining.fetch_sub(1, Ordering::AcqRel) != 1 || records.is_empty() {
            return;
        }
        let records = std::mem::take(&mut *records);
        let path = format::bundle_path(&self.shared.settings.namespace, &bundle.id);
        let shared = Arc::clone(&self.shared);
        let semaphore = Arc::clone(&self.semaphore);
        shared.pending_uploads.fetch_add(1, Ordering::SeqCst);
        self.runtime.spawn(async move {
            if let Ok(_permit) = semaphore.acquire_owned().await {
                for i in 0..shared.remotes.len() {
                    if shared.remotes[i].off.load(Ordering::Relaxed) {
                        continue;
                    }
                    let own: Vec<&[u8]> = records
                        .iter()
                        .filter(|r| r.from.is_none_or(|from| from == i))
                        .map(|r| r.bytes.as_slice())
                        .collect();
                    if own.is_empty() {
                        continue;
                    }
                    if let Err(e) = shared.write(i, &path, format::encode_bundle(&own)).await {
                        shared.failed(i, "writing a bundle", e);
                    }
                }
            }
            shared.pending_uploads.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Asks the remotes for one miss and waits for the answer: for a caller
    /// that fills misses one at a time as they are asked for (a FUSE view,
    /// on first access). Bounded like every request: a remote that does not
    /// answer within the timeout is left alone from then on (until a retry
    /// succeeds, with [`Settings::retry_after`]), and the answer is
    /// [`Answer::Unavailable`] (the caller compiles). The caller checks
    /// what comes back with [`Remotes::accept`], as `link` does.
    ///
    /// With [`Settings::retry_after`], a remote left alone whose cooldown
    /// is over is first tried again in the background, with a request for
    /// this key's entry: this call does not wait for it, later ones use the
    /// remote again if it answered.
    pub fn fetch_one(&self, key: &CompileKey) -> Answer {
        self.retry_due(key);
        if !self.shared.any_on() {
            return Answer::Unavailable;
        }
        let shared = Arc::clone(&self.shared);
        let semaphore = Arc::clone(&self.semaphore);
        let key = *key;
        let (fetched, answered) = self.runtime.block_on(async move {
            let Ok(_permit) = semaphore.acquire_owned().await else {
                return (None, false);
            };
            shared.fetch(&key).await
        });
        match fetched {
            Some(fetched) => Answer::Fetched(fetched),
            None if answered => Answer::Missing,
            None => Answer::Unavailable,
        }
    }

    /// Starts a retry, in the background, of each remote left alone whose
    /// cooldown is over ([`Settings::retry_after`]).
    fn retry_due(&self, key: &CompileKey) {
        let Some(cooldown) = self.shared.settings.retry_after else {
            return;
        };
        for (i, r) in self.shared.remotes.iter().enumerate() {
            if !r.off.load(Ordering::Relaxed) {
                continue;
            }
            {
                let mut retry = crate::util::lock(&r.retry);
                match retry.at {
                    Some(at) if !retry.trying && Instant::now() >= at => retry.trying = true,
                    _ => continue,
                }
            }
            let shared = Arc::clone(&self.shared);
            let path = format::entry_path(&self.shared.settings.namespace, key);
            self.runtime
                .spawn(async move { shared.retry(i, &path, cooldown).await });
        }
    }

    /// For each miss, whether the remotes would give it: what `link` would
    /// fetch instead of compiling, as far as can be told without objects
    /// stored apart. An entry counts when the first remote that has one
    /// holds one that passes every check of [`Remotes::accept`] that needs
    /// no body (well-formed, naming the key and namespace, signed by a
    /// trusted key when any is set, a header with the interpreter's magic,
    /// hash-based flags and the local source's hash), and, when the object
    /// travels inside the entry (most pycs), that object decompresses to
    /// its name and entry. Nothing is stored; the requests are counted.
    pub fn available(&self, wanted: &[Wanted]) -> Vec<bool> {
        if !self.shared.any_on() {
            return vec![false; wanted.len()];
        }
        let tasks: Vec<_> = wanted
            .iter()
            .map(|w| {
                let shared = Arc::clone(&self.shared);
                let semaphore = Arc::clone(&self.semaphore);
                let w = *w;
                self.runtime.spawn(async move {
                    let Ok(_permit) = semaphore.acquire_owned().await else {
                        return false;
                    };
                    shared.probe(&w).await
                })
            })
            .collect();
        self.runtime.block_on(async {
            let mut found = Vec::with_capacity(tasks.len());
            for task in tasks {
                found.push(task.await.unwrap_or(false));
            }
            found
        })
    }

    /// Checks a fetched pyc against what was asked: the interpreter's magic
    /// number, a hash-based header whose source hash is the local source's,
    /// and a body Python can load. Returns it, or `None` (rejected, counted
    /// and said once: the caller compiles).
    pub fn accept(
        &self,
        fetched: Fetched,
        magic: [u8; 4],
        variant: HashVariant,
        source: &[u8],
    ) -> Option<Accepted> {
        let Fetched {
            remote,
            pyc,
            object,
            _held,
            ..
        } = fetched;
        let checked = (|| {
            let header: &[u8; HEADER_LEN] = pyc[..HEADER_LEN].try_into().unwrap();
            check_header(header, magic, &pyc::source_hash(variant, magic, source))?;
            match crate::marshal::check_pyc(&pyc) {
                Err(e) if e.is_damage() => Err(Rejection::Unloadable(e.to_string())),
                _ => Ok(()),
            }
        })();
        let r = &self.shared.remotes[remote];
        match checked {
            Ok(()) => {
                AtomicCounters::add(&r.counters.hits, 1);
                Some(Accepted { pyc, object, _held })
            }
            Err(why) => {
                self.shared.reject(remote, &why);
                None
            }
        }
    }

    /// Uploads the pyc of `key` (its `body`, compiled from `source` by an
    /// interpreter with `magic` and `variant`) to every writable remote, in
    /// the background: the object first, then its entry, signed when a
    /// signing key is set. Returns the entry (for a bundle), or `None` when
    /// nothing is uploaded.
    pub fn upload(
        &self,
        key: &CompileKey,
        magic: [u8; 4],
        variant: HashVariant,
        source: &[u8],
        body: &[u8],
    ) -> Option<BundleRecord> {
        if self.shared.settings.read_only || !self.shared.any_on() {
            return None;
        }
        let (entry, object) = prepare(key, magic, variant, source, body);
        Some(BundleRecord {
            from: None,
            bytes: self.upload_prepared(entry, &object),
        })
    }

    /// Uploads `pyc` and its `entry` in the background; returns the entry's
    /// bytes.
    fn upload_prepared(&self, entry: RemoteEntry, pyc: &[u8]) -> Vec<u8> {
        let (object, record) = self.shared.encode(&entry, pyc);
        let shared = Arc::clone(&self.shared);
        let semaphore = Arc::clone(&self.semaphore);
        shared.pending_uploads.fetch_add(1, Ordering::SeqCst);
        let upload = record.clone();
        self.runtime.spawn(async move {
            if let Ok(_permit) = semaphore.acquire_owned().await {
                shared.put(&entry, object.as_deref(), upload).await;
            }
            shared.pending_uploads.fetch_sub(1, Ordering::SeqCst);
        });
        record
    }

    /// Waits for uploads still in flight, at most the request timeout plus
    /// a second (a cut-off upload leaves nothing a reader accepts).
    pub fn finish(&self) {
        let deadline = Instant::now() + self.shared.settings.timeout + Duration::from_secs(1);
        while self.shared.pending_uploads.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                self.shared.warn(format!(
                    "{} uploads to the remotes did not finish in time and were left off",
                    self.shared.pending_uploads.load(Ordering::SeqCst)
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the remotes counted anything [`Remotes::record`] did not
    /// record yet.
    pub fn unrecorded(&self) -> bool {
        self.shared
            .remotes
            .iter()
            .any(|r| r.counters.snapshot() != *crate::util::lock(&r.recorded))
    }

    /// What each remote did in this process.
    pub fn report(&self) -> Vec<RemoteReport> {
        self.shared
            .remotes
            .iter()
            .map(|r| RemoteReport {
                remote: r.label.clone(),
                counters: r.counters.snapshot(),
                disabled: crate::util::lock(&r.disabled).clone(),
            })
            .collect()
    }

    /// Adds what this process's remotes did since the last call to the
    /// store's counters (for `pycstore stats`): once at the end of a run,
    /// or as it goes for a process that lives long (a mount).
    pub fn record(&self, index: &mut Index) -> crate::Result<()> {
        let mut writes = Writes::default();
        let mut done = Vec::new();
        for r in &self.shared.remotes {
            let now = r.counters.snapshot();
            let delta = now.since(*crate::util::lock(&r.recorded));
            if delta == RemoteCounters::default() {
                continue;
            }
            let key = format!("{COUNTER_PREFIX}{}", r.label);
            let mut total: RemoteCounters = index
                .get(Family::Counters, key.as_bytes())?
                .and_then(|v| serde_json::from_slice(&v).ok())
                .unwrap_or_default();
            total += delta;
            let json = serde_json::to_vec(&total).expect("counters serialize");
            writes.put(Family::Counters, key.as_bytes(), &json);
            done.push((r, now));
        }
        if writes.is_empty() {
            return Ok(());
        }
        index.apply(writes)?;
        for (r, now) in done {
            *crate::util::lock(&r.recorded) = now;
        }
        Ok(())
    }
}

/// A miss to ask about with [`Remotes::available`].
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    /// Its compile key.
    pub key: CompileKey,
    /// The interpreter's magic number.
    pub magic: [u8; 4],
    /// The local source's hash (`importlib.util.source_hash`).
    pub source_hash: [u8; 8],
}

/// The checks of a remote pyc's header against what was asked: the
/// interpreter's magic number, hash-based flags, the local source's hash.
fn check_header(
    header: &[u8; HEADER_LEN],
    magic: [u8; 4],
    source_hash: &[u8; 8],
) -> Result<(), Rejection> {
    let flags = u32::from_le_bytes(header[4..8].try_into().unwrap());
    if header[..4] != magic || flags & !0b11 != 0 || flags & 0b01 == 0 {
        return Err(Rejection::WrongMagic);
    }
    if header[8..16] != source_hash[..] {
        return Err(Rejection::WrongSource);
    }
    Ok(())
}

/// A short account of a storage error: the HTTP status when there is one
/// (not the page that came with it), else the error's own message.
fn describe(e: &opendal::Error) -> String {
    let text = e.to_string();
    let refused = matches!(e.kind(), ErrorKind::PermissionDenied)
        || text.contains("status: 401")
        || text.contains("status: 403")
        || text.contains("uthentication");
    let status = text.split_once("status: ").and_then(|(_, rest)| {
        let code: String = rest.chars().take_while(char::is_ascii_digit).collect();
        (code.len() == 3).then_some(code)
    });
    let mut message = match &status {
        Some(code) => format!("the server answered HTTP {code}"),
        None => {
            let detail = text.rsplit_once(" => ").map_or(text.as_str(), |(_, m)| m);
            let mut m = detail.lines().next().unwrap_or("").to_string();
            // The innermost cause says what went wrong where the message
            // does not (a certificate not trusted, a connection reset).
            let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e);
            let mut innermost = None;
            while let Some(c) = cause {
                innermost = Some(c.to_string());
                cause = c.source();
            }
            if let Some(inner) = innermost.filter(|i| !i.is_empty() && !m.contains(i.as_str())) {
                m.push_str(": ");
                m.push_str(&inner);
            }
            m
        }
    };
    if message.len() > 300 {
        let mut end = 300;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    if refused {
        message.push_str(" (credentials refused? check the remote's credentials)");
    }
    message
}

/// Reads every remote's counters from the index.
pub fn recorded(index: &Index) -> crate::Result<BTreeMap<String, RemoteCounters>> {
    let mut out = BTreeMap::new();
    for (key, value) in index.scan(Family::Counters, COUNTER_PREFIX.as_bytes())? {
        let label = String::from_utf8_lossy(&key[COUNTER_PREFIX.len()..]).into_owned();
        if let Ok(c) = serde_json::from_slice(&value) {
            out.insert(label, c);
        }
    }
    Ok(out)
}

/// The checked-hash pyc of `body` for `source`, and its entry.
fn prepare(
    key: &CompileKey,
    magic: [u8; 4],
    variant: HashVariant,
    source: &[u8],
    body: &[u8],
) -> (RemoteEntry, Vec<u8>) {
    let hash = pyc::source_hash(variant, magic, source);
    let header = pyc::header(magic, Flavor::CheckedHash, HeaderInput::Hash(hash));
    let mut pyc = Vec::with_capacity(HEADER_LEN + body.len());
    pyc.extend_from_slice(&header);
    pyc.extend_from_slice(body);
    let entry = RemoteEntry {
        key: *key,
        object: ObjectId::of(&pyc),
        size: pyc.len() as u64,
        header,
    };
    (entry, pyc)
}

impl Shared {
    /// What goes to a remote for `pyc`: its compressed object, when too
    /// large to travel inside its entry, and the entry (carrying the
    /// object otherwise), signed when a signing key is set.
    fn encode(&self, entry: &RemoteEntry, pyc: &[u8]) -> (Option<Vec<u8>>, Vec<u8>) {
        let compressed = format::encode_object(pyc);
        let inline = compressed.len() <= format::INLINE_MAX;
        let signer = self
            .settings
            .signing_key
            .as_ref()
            .map(|(name, key)| (name.as_str(), key));
        let ns = &self.settings.namespace;
        let record = entry.encode(ns, inline.then_some(compressed.as_slice()), signer);
        let object = if inline { None } else { Some(compressed) };
        (object, record)
    }

    fn any_on(&self) -> bool {
        self.remotes.iter().any(|r| !r.off.load(Ordering::Relaxed))
    }

    fn redact(&self, message: &str) -> String {
        let mut m = message.to_string();
        for s in &self.secrets {
            m = m.replace(s.as_str(), "***");
        }
        m
    }

    fn warn(&self, message: String) {
        let message = self.redact(&message);
        tracing::debug!("{message}");
        crate::util::lock(&self.warnings).push(message);
    }

    /// A request failed: the remote is left alone for the rest of the run,
    /// or until a retry succeeds ([`Settings::retry_after`]); said once per
    /// outage.
    fn failed(&self, i: usize, action: &str, error: String) {
        let r = &self.remotes[i];
        AtomicCounters::add(&r.counters.errors, 1);
        let error = self.redact(&error);
        tracing::debug!("remote `{}`: {action}: {error}", r.label);
        let mut disabled = crate::util::lock(&r.disabled);
        if disabled.is_none() {
            *disabled = Some(format!("{action}: {error}"));
            crate::util::lock(&r.retry).at = self.settings.retry_after.map(|c| Instant::now() + c);
            r.off.store(true, Ordering::Relaxed);
            drop(disabled);
            let until = match self.settings.retry_after {
                None => "for this run".to_string(),
                Some(c) => format!("and trying it again every {}s", c.as_secs_f64()),
            };
            self.warn(format!(
                "remote `{}` cannot be used ({action}: {error}); going on without it {until}: \
                 what it would have given is compiled locally",
                r.label
            ));
        }
    }

    /// Tries remote `i`, left alone, again: a request for `path` (an entry)
    /// from a fresh connection. If it answers (found or not), the remote is
    /// used again; if not, the next retry is due after `cooldown`. Neither
    /// is a warning: the outage was said when it began.
    async fn retry(&self, i: usize, path: &str, cooldown: Duration) {
        let r = &self.remotes[i];
        *crate::util::lock(&r.reachable) = Arc::new(tokio::sync::OnceCell::new());
        match self.get(i, path, Record::Entry).await {
            Read::Found(_) | Read::Missing | Read::Rejected(_) => {
                let why = crate::util::lock(&r.disabled).take();
                *crate::util::lock(&r.retry) = Retry::default();
                r.off.store(false, Ordering::Relaxed);
                tracing::info!(
                    "remote `{}` answers again (it was left alone after: {}); using it again",
                    r.label,
                    why.unwrap_or_default()
                );
            }
            Read::Failed(e) => {
                AtomicCounters::add(&r.counters.errors, 1);
                tracing::debug!(
                    "remote `{}` still cannot be used: {}",
                    r.label,
                    self.redact(&e)
                );
                *crate::util::lock(&r.retry) = Retry {
                    at: Some(Instant::now() + cooldown),
                    trying: false,
                };
            }
        }
    }

    fn reject(&self, i: usize, why: &Rejection) {
        self.reject_then(
            i,
            why,
            "rejected and compiled locally (every rejection is counted in `pycstore stats`)",
        );
    }

    /// A rejection, with what follows from it in the one warning.
    fn reject_then(&self, i: usize, why: &Rejection, then: &str) {
        let r = &self.remotes[i];
        AtomicCounters::add(&r.counters.rejected, 1);
        if !r.warned_reject.swap(true, Ordering::Relaxed) {
            self.warn(format!("remote `{}` returned {why}; {then}", r.label));
        }
    }

    /// Connects once to a network remote before its first request, so a
    /// closed port is known at once (clients retry connecting for a while).
    async fn reachable(&self, i: usize) -> Result<(), String> {
        let r = &self.remotes[i];
        let Some((host, port)) = &r.address else {
            return Ok(());
        };
        let cell = Arc::clone(&crate::util::lock(&r.reachable));
        cell.get_or_init(|| async {
            let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
            match tokio::time::timeout(self.settings.timeout, connect).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot connect to {host}:{port}: {e}")),
                Err(_) => Err(format!(
                    "cannot connect to {host}:{port} within {:.1}s (--remote-timeout)",
                    self.settings.timeout.as_secs_f64()
                )),
            }
        })
        .await
        .clone()
    }

    /// The error of a request that did not answer in time.
    fn timed_out(&self, i: usize) -> String {
        if let Via::Redis(redis) = &self.remotes[i].via {
            redis.reset();
        }
        format!(
            "no answer within {:.1}s (--remote-timeout)",
            self.settings.timeout.as_secs_f64()
        )
    }

    /// Reads `path`, a record of kind `kind`, from remote `i`: at most the
    /// largest valid record of that kind ([`Shared::get_at_most`]).
    async fn get(&self, i: usize, path: &str, kind: Record) -> Read {
        self.get_at_most(i, path, kind, kind.limit()).await
    }

    /// Reads `path`, a record of kind `kind`, from remote `i`: at most
    /// `limit` bytes (a longer answer is cut off and rejected), once the
    /// read budget of its kind allows.
    async fn get_at_most(&self, i: usize, path: &str, kind: Record, limit: usize) -> Read {
        let r = &self.remotes[i];
        if let Err(e) = self.reachable(i).await {
            return Read::Failed(e);
        }
        // A network answer comes in pieces of up to a few hundred KiB: the
        // last one may be read whole before the read stops.
        let most = limit
            + if matches!(r.via, Via::File(_)) {
                0
            } else {
                1 << 20
            };
        let budget = Arc::clone(&self.budget[kind.budget()])
            .acquire_many_owned(most.div_ceil(1024) as u32)
            .await
            .expect("the budget is never closed");
        AtomicCounters::add(&r.counters.requests, 1);
        let counters = &r.counters;
        let read = async {
            let fetched = match &r.via {
                Via::OpenDal { http } => {
                    return read_capped(&r.op, path, limit, counters, *http).await;
                }
                Via::Redis(redis) => redis.get(path, limit).await,
                Via::File(root) => {
                    let (root, path) = (root.clone(), path.to_string());
                    tokio::task::spawn_blocking(move || read_file(&root, &path, limit))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                }
            };
            if let Ok(Fetch::Bytes(bytes)) = &fetched {
                AtomicCounters::add(&counters.bytes_in, bytes.len() as u64);
            }
            fetched
        };
        match tokio::time::timeout(self.settings.timeout, read).await {
            Err(_) => Read::Failed(self.timed_out(i)),
            Ok(Err(e)) => Read::Failed(e),
            Ok(Ok(Fetch::Missing)) => Read::Missing,
            Ok(Ok(Fetch::NotARecord(what))) => {
                Read::Rejected(Rejection::NotARecord(kind.name(), what))
            }
            Ok(Ok(Fetch::Bytes(mut bytes))) => {
                if bytes.len() > limit {
                    Read::Rejected(Rejection::TooLarge(kind.name(), limit))
                } else {
                    if bytes.capacity() > bytes.len() + bytes.len() / 4 {
                        bytes.shrink_to_fit();
                    }
                    // What the read did not need goes back to the budget.
                    let mut budget = budget;
                    let keep = bytes.capacity().div_ceil(1024).max(1);
                    drop(budget.split(budget.num_permits().saturating_sub(keep)));
                    Read::Found(Body {
                        bytes,
                        _budget: budget,
                    })
                }
            }
        }
    }

    async fn write(&self, i: usize, path: &str, bytes: Vec<u8>) -> Result<(), String> {
        let r = &self.remotes[i];
        self.reachable(i).await?;
        AtomicCounters::add(&r.counters.requests, 1);
        let len = bytes.len() as u64;
        let write = async {
            match &r.via {
                Via::Redis(redis) => redis.set(path, bytes).await,
                Via::File(root) => {
                    let (root, path) = (root.clone(), path.to_string());
                    tokio::task::spawn_blocking(move || {
                        write_file(&root, &path, &bytes).map_err(|e| {
                            format!("cannot write `{path}` in `{}`: {e}", root.display())
                        })
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                }
                Via::OpenDal { .. } => {
                    r.op.write(path, bytes)
                        .await
                        .map(drop)
                        .map_err(|e| describe(&e))
                }
            }
        };
        match tokio::time::timeout(self.settings.timeout, write).await {
            Err(_) => Err(self.timed_out(i)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => {
                AtomicCounters::add(&r.counters.bytes_out, len);
                Ok(())
            }
        }
    }

    /// Asks each remote in turn for `key`: what one gave, and whether
    /// every remote answered (none left alone, none failing now).
    async fn fetch(&self, key: &CompileKey) -> (Option<Fetched>, bool) {
        let mut answered = true;
        for (i, r) in self.remotes.iter().enumerate() {
            if r.off.load(Ordering::Relaxed) {
                answered = false;
                continue;
            }
            match self.fetch_at(i, key).await {
                Step::Got(fetched) => return (Some(fetched), true),
                Step::Missing => {}
                Step::Rejected => return (None, true),
                Step::Failed => answered = false,
            }
        }
        (None, answered)
    }

    /// Asks remote `i` for the entry of `key`.
    async fn fetch_at(&self, i: usize, key: &CompileKey) -> Step {
        let path = format::entry_path(&self.settings.namespace, key);
        let read = self.get(i, &path, Record::Entry).await;
        let bytes = match self.found(i, read, "reading an entry") {
            Ok(bytes) => bytes,
            Err(step) => return step,
        };
        let step = self.open_entry(i, key, &bytes, None).await;
        match step {
            // Kept to go into a bundle, should this run write one (out of
            // the read budget: it is small, and kept until the bundle's
            // last miss is settled).
            Step::Got(mut fetched) => {
                fetched.record = Some(bytes.bytes);
                Step::Got(fetched)
            }
            step => step,
        }
    }

    /// The bytes a read of remote `i` found, or how the fetch ends: a miss
    /// (counted), a rejection (counted and said), or a failure of `action`
    /// (the remote is left alone).
    fn found(&self, i: usize, read: Read, action: &str) -> Result<Body, Step> {
        match read {
            Read::Found(bytes) => Ok(bytes),
            Read::Missing => {
                AtomicCounters::add(&self.remotes[i].counters.misses, 1);
                Err(Step::Missing)
            }
            Read::Rejected(why) => {
                self.reject(i, &why);
                Err(Step::Rejected)
            }
            Read::Failed(e) => {
                self.failed(i, action, e);
                Err(Step::Failed)
            }
        }
    }

    /// Takes `kib` of [`PYC_BUDGET`], waiting for fetched pycs to be
    /// dropped if need be.
    async fn hold(&self, kib: u32) -> tokio::sync::OwnedSemaphorePermit {
        Arc::clone(&self.held)
            .acquire_many_owned(kib)
            .await
            .expect("the budget is never closed")
    }

    /// The pyc of the entry `bytes` of `key` from remote `i` (fetching its
    /// object when the entry does not carry it), checked against its name
    /// and entry. Its share of [`PYC_BUDGET`] is taken from `bundle`, when
    /// the entry came in a bundle (which took what its pycs need), else
    /// waited for before the pyc is decompressed.
    async fn open_entry(
        &self,
        i: usize,
        key: &CompileKey,
        bytes: &[u8],
        bundle: Option<&mut tokio::sync::OwnedSemaphorePermit>,
    ) -> Step {
        let ns = &self.settings.namespace;
        let (entry, inline) = match format::decode_entry(bytes, key, ns, &self.settings.trusted) {
            Ok(found) => found,
            Err(why) => {
                self.reject(i, &why);
                return Step::Rejected;
            }
        };
        // A size no pyc taken from a remote has is rejected unread; what
        // the pyc needs of PYC_BUDGET is taken before an object stored
        // apart is read (every fetch takes its budgets in one order).
        if let Err(why) = format::check_size(&entry) {
            self.reject(i, &why);
            return Step::Rejected;
        }
        let need = pyc_kib(entry.size);
        let held = match bundle {
            Some(taken) => match taken.split(need as usize) {
                Some(held) => held,
                // Not counted when the bundle took its share (it cannot
                // be: the same bytes give the size): fetched by name.
                None => return Step::Missing,
            },
            None => self.hold(need).await,
        };
        let compressed;
        let object: &[u8] = match inline {
            Some(inline) => inline,
            None => {
                // Read no more than the entry's size allows.
                let path = format::object_path(ns, &entry.object);
                let limit = format::object_limit(entry.size);
                // Missing: an entry whose object is gone (or not there yet).
                let read = self.get_at_most(i, &path, Record::Object, limit).await;
                match self.found(i, read, "reading an object") {
                    Ok(bytes) => {
                        compressed = bytes;
                        &compressed
                    }
                    Err(step) => return step,
                }
            }
        };
        match format::decode_object(object, &entry) {
            Ok(pyc) => Step::Got(Fetched {
                remote: i,
                pyc,
                object: entry.object,
                record: None,
                _held: held,
            }),
            Err(why) => {
                self.reject(i, &why);
                Step::Rejected
            }
        }
    }

    /// Asks the remotes, in turn, for the bundle `id` of a directory whose
    /// misses have the compile keys `keys`, until one has it: what it gave
    /// for each key (checked like any entry), and whether this run should
    /// write the bundle (writable remotes, every one answered, and none
    /// held a bundle whose entries all checked out).
    async fn fetch_bundle(
        &self,
        id: &[u8; 32],
        keys: &[CompileKey],
    ) -> (Vec<Option<Fetched>>, bool) {
        let mut got: Vec<Option<Fetched>> = keys.iter().map(|_| None).collect();
        let mut answered = true;
        let mut usable = false;
        let path = format::bundle_path(&self.settings.namespace, id);
        for (i, r) in self.remotes.iter().enumerate() {
            if r.off.load(Ordering::Relaxed) {
                answered = false;
                continue;
            }
            let bytes = match self.get(i, &path, Record::Bundle).await {
                Read::Found(bytes) => bytes,
                Read::Missing => continue,
                Read::Rejected(why) => {
                    self.reject_then(i, &why, "its pycs are asked for one by one");
                    break;
                }
                Read::Failed(e) => {
                    self.failed(i, "reading a bundle", e);
                    answered = false;
                    continue;
                }
            };
            let entries = match format::decode_bundle(&bytes) {
                Ok(entries) => entries,
                Err(why) => {
                    self.reject_then(i, &why, "its pycs are asked for one by one");
                    break;
                }
            };
            usable = true;
            // What the bundle gives is held until it is all checked: past
            // BUNDLE_PYCS_MAX, the rest is fetched by name. What its pycs
            // need of PYC_BUDGET is taken at once, before any of them.
            let (mut taken, mut need, mut upto) = (0u64, 0u32, keys.len());
            for (n, key) in keys.iter().enumerate() {
                if let Some(entry) = entries.get(key) {
                    let size = format::entry_size(entry).unwrap_or(0);
                    if taken + size.min(format::MAX_OBJECT) > format::BUNDLE_PYCS_MAX {
                        upto = n;
                        break;
                    }
                    taken += size.min(format::MAX_OBJECT);
                    need += pyc_kib(size);
                }
            }
            let mut held = self.hold(need).await;
            for (key, slot) in keys[..upto].iter().zip(&mut got) {
                // A request for an object stored apart failed: the remote
                // is left alone, for the rest of the bundle too.
                if r.off.load(Ordering::Relaxed) {
                    answered = false;
                    break;
                }
                if let Some(entry) = entries.get(key) {
                    match self.open_entry(i, key, entry, Some(&mut held)).await {
                        Step::Got(fetched) => {
                            *slot = Some(fetched);
                        }
                        Step::Rejected => usable = false,
                        Step::Missing | Step::Failed => {}
                    }
                }
            }
            break;
        }
        let write = answered && !usable && !self.settings.read_only;
        (got, write)
    }

    /// Whether the remotes would give `w` (see [`Remotes::available`]):
    /// asks them in turn as [`Shared::fetch`] does, and, like it, stops at
    /// the first that holds an entry, taken or not.
    async fn probe(&self, w: &Wanted) -> bool {
        let ns = &self.settings.namespace;
        for (i, r) in self.remotes.iter().enumerate() {
            if r.off.load(Ordering::Relaxed) {
                continue;
            }
            let bytes = match self
                .get(i, &format::entry_path(ns, &w.key), Record::Entry)
                .await
            {
                Read::Found(bytes) => bytes,
                Read::Missing => {
                    AtomicCounters::add(&r.counters.misses, 1);
                    continue;
                }
                Read::Rejected(why) => {
                    self.reject_then(i, &why, "not counted as one a remote would give");
                    return false;
                }
                Read::Failed(e) => {
                    self.failed(i, "reading an entry", e);
                    continue;
                }
            };
            let checked = format::decode_entry(&bytes, &w.key, ns, &self.settings.trusted)
                .and_then(|(entry, inline)| {
                    check_header(&entry.header, w.magic, &w.source_hash)?;
                    match inline {
                        Some(inline) => format::decode_object(inline, &entry).map(drop),
                        None => Ok(()),
                    }
                });
            return match checked {
                Ok(()) => true,
                Err(why) => {
                    self.reject_then(i, &why, "not counted as one a remote would give");
                    false
                }
            };
        }
        false
    }

    /// Writes an object (unless its entry carries it) and then its entry
    /// to every writable remote.
    async fn put(&self, entry: &RemoteEntry, object: Option<&[u8]>, record: Vec<u8>) {
        for i in 0..self.remotes.len() {
            if !self.remotes[i].off.load(Ordering::Relaxed) {
                self.put_to(i, entry, object, record.clone()).await;
            }
        }
    }

    /// Writes an object (unless its entry carries it) and then its entry
    /// to remote `i`.
    async fn put_to(&self, i: usize, entry: &RemoteEntry, object: Option<&[u8]>, record: Vec<u8>) {
        let ns = &self.settings.namespace;
        if let Some(object) = object {
            let path = format::object_path(ns, &entry.object);
            if let Err(e) = self.write(i, &path, object.to_vec()).await {
                self.failed(i, "writing an object", e);
                return;
            }
        }
        if let Err(e) = self
            .write(i, &format::entry_path(ns, &entry.key), record)
            .await
        {
            self.failed(i, "writing an entry", e);
            return;
        }
        AtomicCounters::add(&self.remotes[i].counters.uploads, 1);
    }
}

/// Direct access to what a remote stores, by name: for tests that play a
/// hostile writer, and for debugging. Not used by any command.
#[doc(hidden)]
impl Remotes {
    /// Every name under `dir` (recursively) on remote `i`.
    pub fn raw_list(&self, i: usize, dir: &str) -> Result<Vec<String>, String> {
        let op = self.shared.remotes[i].op.clone();
        let dir = dir.to_string();
        self.runtime.block_on(async move {
            let entries = op
                .list_with(&dir)
                .recursive(true)
                .await
                .map_err(|e| describe(&e))?;
            Ok(entries
                .into_iter()
                .filter(|e| !e.path().ends_with('/'))
                .map(|e| e.path().to_string())
                .collect())
        })
    }

    /// The bytes of `path` on remote `i`.
    pub fn raw_read(&self, i: usize, path: &str) -> Result<Vec<u8>, String> {
        let op = self.shared.remotes[i].op.clone();
        let path = path.to_string();
        self.runtime.block_on(async move {
            op.read(&path)
                .await
                .map(|b| b.to_vec())
                .map_err(|e| describe(&e))
        })
    }

    /// Removes `path` on remote `i`.
    pub fn raw_delete(&self, i: usize, path: &str) -> Result<(), String> {
        let op = self.shared.remotes[i].op.clone();
        let path = path.to_string();
        self.runtime
            .block_on(async move { op.delete(&path).await.map_err(|e| describe(&e)) })
    }

    /// Writes `bytes` as `path` on remote `i`.
    pub fn raw_write(&self, i: usize, path: &str, bytes: Vec<u8>) -> Result<(), String> {
        let op = self.shared.remotes[i].op.clone();
        let path = path.to_string();
        self.runtime.block_on(async move {
            op.write(&path, bytes)
                .await
                .map(|_| ())
                .map_err(|e| describe(&e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundles of directories with the given keys, every directory
    /// holding one miss.
    fn bundles(dirs: &[Vec<CompileKey>]) -> Vec<([u8; 32], Vec<usize>)> {
        let mut bundler = Bundler::default();
        let mut out = Vec::new();
        for (i, keys) in dirs.iter().enumerate() {
            out.extend(bundler.add(keys.clone(), vec![i]));
        }
        out.extend(bundler.finish());
        out.into_iter()
            .map(|g| (g.bundle.unwrap(), g.misses))
            .collect()
    }

    fn key(i: u32) -> CompileKey {
        CompileKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[test]
    fn bundles_are_cut_by_content_so_a_change_stays_local() {
        let dirs: Vec<Vec<CompileKey>> = (0..400)
            .map(|d| (0..3).map(|k| key(d * 10 + k)).collect())
            .collect();
        let before = bundles(&dirs);
        // Every directory in exactly one bundle, in walk order.
        let order: Vec<usize> = before.iter().flat_map(|(_, m)| m.clone()).collect();
        assert_eq!(order, (0..400).collect::<Vec<_>>());
        // About one directory in DIRS_PER_BUNDLE ends a bundle.
        assert!(
            (25..=80).contains(&before.len()),
            "{} bundles",
            before.len()
        );
        // The same directories give the same bundles.
        assert_eq!(bundles(&dirs), before);
        // A source changed in one directory: at most two bundles change.
        let mut changed = dirs.clone();
        changed[200][1] = key(999_999);
        let after = bundles(&changed);
        let kept = after.iter().filter(|b| before.contains(b)).count();
        assert!(kept + 2 >= before.len(), "{kept} of {} kept", before.len());
        assert!(kept < after.len());
        // A directory added (a package installed): the cuts after it stay
        // where they were (a cut every so many directories would move all).
        let mut added = dirs.clone();
        added.insert(200, vec![key(777_777), key(777_778)]);
        let names = |b: &[([u8; 32], Vec<usize>)]| b.iter().map(|(n, _)| *n).collect::<Vec<_>>();
        let (before, after) = (names(&before), names(&bundles(&added)));
        let kept = after.iter().filter(|b| before.contains(b)).count();
        assert!(kept + 2 >= before.len(), "{kept} of {} kept", before.len());
    }

    #[test]
    fn a_bundle_ends_at_its_key_limit_and_only_misses_are_sent() {
        let big: Vec<CompileKey> = (0..MAX_BUNDLE_KEYS as u32).map(key).collect();
        let mut bundler = Bundler::default();
        assert!(bundler.add(big, vec![1]).is_some());
        // Directories without misses send nothing, whatever their keys.
        let mut bundler: Bundler<usize> = Bundler::default();
        for d in 0..100 {
            assert!(bundler.add(vec![key(d), key(d + 1000)], vec![]).is_none());
        }
        assert!(bundler.finish().is_none());
    }

    /// Fetched pycs are held, decompressed, within [`PYC_BUDGET`]: entries
    /// of a few hundred bytes whose pycs take 8 MiB each, taken by a
    /// consumer slower than the fetches, never have more than the budget
    /// alive at once (without it, 43 of the 48, 344 MiB, were).
    #[test]
    fn fetched_pycs_are_held_within_their_budget() {
        use std::sync::atomic::AtomicU64;
        let dir = tempfile::tempdir().unwrap();
        let requested = Requested {
            urls: vec![format!("file://{}", dir.path().display())],
            timeout_secs: 30.0,
            namespace: "budget".into(),
            concurrency: 16,
            ..Default::default()
        };
        let settings = Settings::resolve(&requested, &|_| None).unwrap().unwrap();
        let remotes = Remotes::new(settings).unwrap();
        let magic = [0xa7, 0x0d, 0x0d, 0x0a];
        let body = vec![0u8; 8 << 20];
        let keys: Vec<CompileKey> = (0..48).map(key).collect();
        for k in &keys {
            remotes.upload(k, magic, HashVariant::Siphash13, b"x = 1\n", &body);
        }
        remotes.finish();
        let entries = remotes.raw_list(0, "").unwrap();
        assert!(
            entries.iter().filter(|e| e.contains("/entries/")).count() == keys.len()
                && !entries.iter().any(|e| e.contains("/objects/")),
            "every pyc travels in its entry: {entries:?}"
        );
        let live = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let (tx, rx) = crossbeam_channel::unbounded::<Fetched>();
        let consumer = {
            let live = Arc::clone(&live);
            std::thread::spawn(move || {
                let mut taken = 0;
                for fetched in rx {
                    std::thread::sleep(Duration::from_millis(20));
                    // Counted out before it is dropped: a fetch waiting
                    // for its share goes on only once it is.
                    live.fetch_sub(fetched.pyc.len() as u64, Ordering::SeqCst);
                    drop(fetched);
                    taken += 1;
                }
                taken
            })
        };
        let (wanted_tx, wanted) = crossbeam_channel::unbounded();
        for k in &keys {
            wanted_tx
                .send(MissGroup {
                    bundle: None,
                    misses: vec![*k],
                })
                .unwrap();
        }
        drop(wanted_tx);
        let counted = (Arc::clone(&live), Arc::clone(&most));
        remotes.fetch_misses(
            wanted,
            |k: &CompileKey| Some(*k),
            move |_, fetched, _| {
                let fetched = fetched.expect("every key is on the remote");
                let now = counted
                    .0
                    .fetch_add(fetched.pyc.len() as u64, Ordering::SeqCst)
                    + fetched.pyc.len() as u64;
                counted.1.fetch_max(now, Ordering::SeqCst);
                tx.send(fetched).unwrap();
            },
        );
        assert_eq!(consumer.join().unwrap(), keys.len());
        let most = most.load(Ordering::SeqCst);
        assert!(
            most > 0 && most <= PYC_BUDGET as u64,
            "{most} bytes of fetched pycs alive at once, against a budget of {PYC_BUDGET}"
        );
    }
}
