//! Sources as the store sees them: found under a prefix, stat'ed, and known
//! by the blake3 of their bytes, taken from the stat cache when the file is
//! unchanged. Shared by `link`, `status` and the FUSE views.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::index::{Index, StatRecord, Writes};
use crate::interpreter::{self, Interpreter};
use crate::key::SourceDigest;
use crate::pyc::{self, Flavor, HeaderInput};
use crate::walk::{self, Excludes, Found};
use crate::Result;

/// A stat-cache record is trusted only for files whose last change is older
/// than the moment they were hashed by more than the filesystem's timestamp
/// granularity: a file changed again within the same clock tick could
/// otherwise hide its change. Kernel file times tick every few milliseconds;
/// filesystems with whole-second times get a two-second window.
const RACY_WINDOW_NS: i64 = 100_000_000;
const RACY_WINDOW_COARSE_NS: i64 = 2_000_000_000;

/// A source file: its stat, its digest, and its bytes once read.
pub struct Source {
    /// The path as found under the prefix.
    pub path: PathBuf,
    /// The device of its directory (where its pyc goes).
    pub dir_dev: u64,
    /// `stat` of the file (following a symlink).
    pub meta: std::fs::Metadata,
    /// blake3 of its bytes.
    pub digest: SourceDigest,
    bytes: OnceLock<std::result::Result<Arc<Vec<u8>>, String>>,
}

/// What became of hashing a found file.
pub enum Hashed {
    /// Hashed (or known from the stat cache).
    Source(Box<Source>),
    /// It vanished or changed while being read: the next run picks it up.
    Skipped,
    /// It could not be read.
    Failed(String),
}

impl Source {
    /// Stats and hashes `found`, trusting `index`'s stat cache for unchanged
    /// files; a fresh hash is recorded into `writes` (unless it is `None`).
    pub fn hash(found: &Found, index: &Index, now_ns: i64, writes: Option<&mut Writes>) -> Hashed {
        let meta = match std::fs::metadata(&found.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Hashed::Skipped,
            Err(e) => return Hashed::Failed(format!("cannot stat: {e}")),
        };
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        let ctime_ns = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
        let window = if meta.ctime_nsec() == 0 {
            RACY_WINDOW_COARSE_NS
        } else {
            RACY_WINDOW_NS
        };
        let cached = match index.stat(&found.path) {
            Ok(cached) => cached,
            Err(e) => return Hashed::Failed(e.to_string()),
        };
        let fresh = |r: &StatRecord| {
            r.dev == meta.dev()
                && r.ino == meta.ino()
                && r.size == meta.size()
                && r.mtime_ns == mtime_ns
                && r.ctime_ns == ctime_ns
                && ctime_ns.max(mtime_ns) + window < r.seen_ns
        };
        let bytes = OnceLock::new();
        let digest = match cached.filter(fresh) {
            Some(record) => record.digest,
            None => {
                let data = match std::fs::read(&found.path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Hashed::Skipped,
                    Err(e) => return Hashed::Failed(format!("cannot read: {e}")),
                };
                if data.len() as u64 != meta.size() {
                    return Hashed::Skipped;
                }
                let digest = SourceDigest::of(&data);
                if let Some(writes) = writes {
                    let record = StatRecord {
                        dev: meta.dev(),
                        ino: meta.ino(),
                        size: meta.size(),
                        mtime_ns,
                        ctime_ns,
                        seen_ns: now_ns,
                        digest,
                    };
                    writes.stat(&found.path, &record);
                }
                let _ = bytes.set(Ok(Arc::new(data)));
                digest
            }
        };
        Hashed::Source(Box::new(Source {
            path: found.path.clone(),
            dir_dev: found.dir_dev,
            meta,
            digest,
            bytes,
        }))
    }

    /// The source bytes, read at most once and checked against the digest
    /// the keys were made from.
    pub fn bytes(&self) -> std::result::Result<Arc<Vec<u8>>, String> {
        self.bytes
            .get_or_init(|| {
                let bytes = std::fs::read(&self.path).map_err(|e| format!("cannot read: {e}"))?;
                if SourceDigest::of(&bytes) != self.digest {
                    return Err("changed while being linked; run again".into());
                }
                Ok(Arc::new(bytes))
            })
            .clone()
    }

    /// What the header of this source's pyc is made from.
    pub fn header_input(
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

    /// Where `interpreter` looks for this source's pyc at `optimize`.
    pub fn pyc_path(&self, interpreter: &Interpreter, optimize: u8) -> Option<PathBuf> {
        pyc_path(&self.path, interpreter, optimize)
    }
}

/// `DIR/__pycache__/NAME.TAG[.opt-N].pyc` for the source `DIR/NAME.py`.
pub fn pyc_path(source: &Path, interpreter: &Interpreter, optimize: u8) -> Option<PathBuf> {
    let dir = source.parent()?;
    let name = source.file_name()?.as_encoded_bytes();
    let stem = name.strip_suffix(b".py")?;
    // SAFETY: `stem` is a prefix of an OsStr, cut before the ASCII ".py".
    let mut file = OsString::from(unsafe { OsStr::from_encoded_bytes_unchecked(stem) });
    file.push(interpreter.pyc_name("", optimize));
    Some(dir.join("__pycache__").join(file))
}

/// What [`Plan::walk`] found: each source with the indexes of its
/// interpreters, and the paths that could not be read, with why.
pub type Walked = (Vec<(Found, Vec<usize>)>, Vec<(PathBuf, String)>);

/// The prefixes to work on, each with the interpreters it is for.
pub struct Plan {
    /// Every interpreter involved, probed once.
    pub interpreters: Vec<Interpreter>,
    /// Absolute prefix paths, each with indexes into `interpreters`.
    pub prefixes: Vec<(PathBuf, Vec<usize>)>,
}

impl Plan {
    /// Resolves each prefix's interpreters: `python` when given, else the
    /// prefix's own; new probes are cached in the index.
    pub fn new(prefixes: &[PathBuf], python: &[PathBuf], index: &mut Index) -> Result<Plan> {
        let mut writes = Writes::default();
        let plan = Self::resolve(prefixes, python, index, &mut writes)?;
        index.apply(writes)?;
        Ok(plan)
    }

    /// As [`Plan::new`], recording new probes into `writes`.
    pub fn resolve(
        prefixes: &[PathBuf],
        python: &[PathBuf],
        index: &Index,
        writes: &mut Writes,
    ) -> Result<Plan> {
        let mut interpreters: Vec<Interpreter> = Vec::new();
        let mut index_of = |exe: &Path, writes: &mut Writes| -> Result<usize> {
            if let Some(i) = interpreters.iter().position(|p| p.executable == exe) {
                return Ok(i);
            }
            interpreters.push(Interpreter::probe_cached(exe, index, writes)?);
            Ok(interpreters.len() - 1)
        };
        let mut resolved = Vec::new();
        for prefix in prefixes {
            let prefix = std::path::absolute(prefix)?;
            let chosen = if python.is_empty() {
                vec![index_of(&interpreter::find_in_prefix(&prefix)?, writes)?]
            } else {
                python
                    .iter()
                    .map(|exe| index_of(exe, writes))
                    .collect::<Result<Vec<_>>>()?
            };
            resolved.push((prefix, chosen));
        }
        Ok(Plan {
            interpreters,
            prefixes: resolved,
        })
    }

    /// Walks every prefix: the sources with their interpreters, and what
    /// could not be read.
    pub fn walk(&self, excludes: &Excludes) -> Walked {
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for (prefix, chosen) in &self.prefixes {
            if !prefix.is_dir() {
                errors.push((prefix.clone(), "not a directory".to_string()));
                continue;
            }
            let (found, errs) = walk::walk(prefix, excludes);
            errors.extend(errs);
            sources.extend(found.into_iter().map(|f| (f, chosen.clone())));
        }
        (sources, errors)
    }
}
