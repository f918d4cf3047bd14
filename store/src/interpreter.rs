//! Interpreters: what a Python executable answers when asked, and where to
//! find the one that belongs to a prefix.
//!
//! A probe costs a process start, so its answer is cached in the index keyed
//! by the executable's path and identity (the resolved file's device, inode,
//! size and mtime): replacing the interpreter invalidates the cache.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::index::{Family, Index, Writes};
use crate::key::{CompileKey, SourceDigest, COMPILE_FLAGS_DEFAULT};
use crate::pyc::{source_hash, HashVariant};
use crate::python_trust::{self, Checker, Verdict};
use crate::{Error, Result};

/// Asks the interpreter what decides its pycs. Runs isolated (`-I`) so the
/// user's `PYTHON*` variables cannot change the answer, without `site` (`-S`)
/// so that nothing of the prefix runs (a venv's `.pth` files and
/// `sitecustomize` execute code), and with `-B`. Without `site`, a venv is
/// recognized as `site.venv` does (a `pyvenv.cfg` beside the executable or
/// one level up makes its parent `sys.prefix`), before `sysconfig` reads
/// `sys.prefix`. `loaded` lists the files of every module it imported (a
/// superset of what a compile worker imports), to be checked like the
/// executable.
const PROBE: &str = r#"
import sys, os
exe_dir = os.path.dirname(os.path.abspath(sys.executable))
for d in (exe_dir, os.path.dirname(exe_dir)):
    if os.path.isfile(os.path.join(d, "pyvenv.cfg")):
        sys.prefix = sys.exec_prefix = os.path.dirname(exe_dir)
        break
import json, sysconfig, importlib.util, marshal, warnings
loaded = set()
for m in list(sys.modules.values()):
    for attr in ("__file__", "__cached__"):
        f = getattr(m, attr, None)
        if isinstance(f, str):
            loaded.add(os.path.abspath(f))
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": "%d.%d.%d" % sys.version_info[:3],
    "cache_tag": sys.implementation.cache_tag,
    "magic": importlib.util.MAGIC_NUMBER.hex(),
    "probe_hash": importlib.util.source_hash(b"pycstore probe").hex(),
    "prefix": sys.prefix,
    "stdlib": sysconfig.get_path("stdlib"),
    "purelib": sysconfig.get_path("purelib"),
    "loaded": sorted(loaded),
}))
"#;

/// Bump when the probe's fields change, so cached probes are redone.
const PROBE_VERSION: u32 = 3;

#[derive(Deserialize)]
struct RawProbe {
    implementation: String,
    version: String,
    cache_tag: Option<String>,
    magic: String,
    probe_hash: String,
    prefix: PathBuf,
    stdlib: PathBuf,
    purelib: PathBuf,
    loaded: Vec<PathBuf>,
}

/// A probed interpreter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Interpreter {
    /// The executable as given (not resolved: a venv's `bin/python` symlink
    /// knows its venv).
    pub executable: PathBuf,
    /// `sys.implementation.name`: `cpython`, `pypy`.
    pub implementation: String,
    /// `major.minor.micro`.
    pub version: String,
    /// `sys.implementation.cache_tag`: names the pyc files (`cpython-311`).
    pub cache_tag: String,
    /// `importlib.util.MAGIC_NUMBER` (hex in JSON).
    #[serde(with = "magic_hex")]
    pub magic: [u8; 4],
    /// The SipHash of its `source_hash`.
    pub hash_variant: HashVariant,
    /// `sys.prefix`.
    pub prefix: PathBuf,
    /// The standard library directory.
    pub stdlib: PathBuf,
    /// `site-packages`.
    pub purelib: PathBuf,
    /// Where its compile keys live: `None` for an interpreter only root and
    /// the caller can change; for any other, a domain of its own, so that
    /// nothing it compiles serves another interpreter. Decided on every
    /// probe, never cached.
    #[serde(skip)]
    pub key_domain: Option<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct CachedProbe {
    version: u32,
    identity: (u64, u64, u64, i64),
    interpreter: Interpreter,
    /// The files the probe reported loading, checked again on every use.
    loaded: Vec<PathBuf>,
}

impl Interpreter {
    /// Probes `executable`, using the index's cached answer when the
    /// executable is unchanged.
    pub fn probe(executable: &Path, index: Option<&mut Index>) -> Result<Interpreter> {
        let Some(index) = index else {
            let identity = identity_of(executable)?;
            let mut trust = Trust::new(executable, identity, false)?;
            let (interpreter, loaded) = Self::run_probe(executable)?;
            trust.loaded(&loaded)?;
            return Ok(trust.apply(interpreter));
        };
        let mut writes = Writes::default();
        let interpreter = Self::probe_cached(executable, index, &mut writes)?;
        index.apply(writes)?;
        Ok(interpreter)
    }

    /// Probes `executable` unless `index` has its answer; a new answer is
    /// recorded into `writes`.
    pub(crate) fn probe_cached(
        executable: &Path,
        index: &Index,
        writes: &mut Writes,
    ) -> Result<Interpreter> {
        let identity = identity_of(executable)?;
        // Checked before the cache is consulted: a cached answer says
        // nothing about who can change the interpreter now.
        let shared = index.path().parent().is_some_and(crate::trust::is_shared);
        let mut trust = Trust::new(executable, identity, shared)?;
        if let Some(raw) = index.interpreter(executable)? {
            if let Ok(cached) = serde_json::from_slice::<CachedProbe>(&raw) {
                if cached.version == PROBE_VERSION && cached.identity == identity {
                    trust.loaded(&cached.loaded)?;
                    return Ok(trust.apply(cached.interpreter));
                }
            }
        }
        let (interpreter, loaded) = Self::run_probe(executable)?;
        trust.loaded(&loaded)?;
        let cached = CachedProbe {
            version: PROBE_VERSION,
            identity,
            interpreter: interpreter.clone(),
            loaded,
        };
        writes.put(
            Family::Interpreters,
            &crate::index::path_key(executable),
            &serde_json::to_vec(&cached).expect("serializable"),
        );
        Ok(trust.apply(interpreter))
    }

    fn run_probe(executable: &Path) -> Result<(Interpreter, Vec<PathBuf>)> {
        let fail = |message: String| Error::Probe {
            path: executable.to_path_buf(),
            message,
        };
        let output = Command::new(executable)
            .args(["-I", "-S", "-B", "-c", PROBE])
            .output()
            .map_err(|e| fail(e.to_string()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().last().unwrap_or("").trim().to_string();
            return Err(
                if last.contains("SyntaxError") || last.contains("source_hash") {
                    Error::Unsupported {
                        path: executable.to_path_buf(),
                        reason:
                            "pycstore needs Python 3.7 or later (hash-based pycs, 16-byte headers)"
                                .into(),
                    }
                } else {
                    fail(format!("exited with {}: {last}", output.status))
                },
            );
        }
        let raw: RawProbe = serde_json::from_slice(&output.stdout)
            .map_err(|e| fail(format!("unexpected answer: {e}")))?;
        let unsupported = |reason: String| Error::Unsupported {
            path: executable.to_path_buf(),
            reason,
        };
        let cache_tag = raw.cache_tag.ok_or_else(|| {
            unsupported(
                "its sys.implementation.cache_tag is None: it never reads or writes pycs".into(),
            )
        })?;
        let magic: [u8; 4] = decode_hex(&raw.magic)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| fail(format!("unexpected magic number `{}`", raw.magic)))?;
        let want = decode_hex(&raw.probe_hash).unwrap_or_default();
        let hash_variant = HashVariant::ALL
            .into_iter()
            .find(|v| source_hash(*v, magic, b"pycstore probe").as_slice() == want)
            .ok_or_else(|| {
                unsupported("its source hash is neither SipHash-1-3 nor SipHash-2-4".into())
            })?;
        let interpreter = Interpreter {
            executable: executable.to_path_buf(),
            implementation: raw.implementation,
            version: raw.version,
            cache_tag,
            magic,
            hash_variant,
            prefix: raw.prefix,
            stdlib: raw.stdlib,
            purelib: raw.purelib,
            key_domain: None,
        };
        Ok((interpreter, raw.loaded))
    }

    /// The key of compiling `source` at `optimize` for this interpreter:
    /// every caller derives keys here, so an interpreter others can change
    /// never shares keys with another.
    pub fn compile_key(&self, source: &SourceDigest, optimize: u8) -> CompileKey {
        CompileKey::in_domain(
            source,
            self.magic,
            optimize,
            COMPILE_FLAGS_DEFAULT,
            self.key_domain.as_ref(),
        )
    }

    /// The pyc file name of `stem` (a module file name without `.py`) for
    /// optimize level `optimize`: `stem.TAG.pyc`, `stem.TAG.opt-1.pyc`.
    pub fn pyc_name(&self, stem: &str, optimize: u8) -> String {
        let mut name = stem.as_bytes().to_vec();
        self.push_pyc_suffix(&mut name, optimize);
        String::from_utf8(name).expect("a str stem and a str cache tag")
    }

    /// Appends what follows the stem in a pyc's name, `.TAG.pyc` or
    /// `.TAG.opt-N.pyc`, to `name`.
    pub(crate) fn push_pyc_suffix(&self, name: &mut Vec<u8>, optimize: u8) {
        name.push(b'.');
        name.extend_from_slice(self.cache_tag.as_bytes());
        if optimize != 0 {
            name.extend_from_slice(b".opt-");
            name.extend_from_slice(optimize.to_string().as_bytes());
        }
        name.extend_from_slice(b".pyc");
    }
}

/// The executable's identity: the resolved file's device, inode, size and
/// mtime.
fn identity_of(executable: &Path) -> Result<(u64, u64, u64, i64)> {
    let meta = std::fs::metadata(executable).map_err(|e| Error::Probe {
        path: executable.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok((
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
    ))
}

/// The trust decision about one interpreter: checked before it runs, and
/// again on the files its probe loaded.
struct Trust<'a> {
    executable: &'a Path,
    identity: (u64, u64, u64, i64),
    /// Refuse an untrusted interpreter (the caller is root or the store is
    /// shared) unless overridden.
    enforce: bool,
    checker: Checker,
    verdict: Verdict,
}

impl<'a> Trust<'a> {
    fn new(executable: &'a Path, identity: (u64, u64, u64, i64), shared: bool) -> Result<Self> {
        let mut checker = Checker::new();
        let verdict = checker.interpreter(executable);
        let enforce = shared || rustix::process::geteuid().is_root();
        let trust = Trust {
            executable,
            identity,
            enforce,
            checker,
            verdict,
        };
        trust.decide()?;
        Ok(trust)
    }

    fn loaded(&mut self, files: &[PathBuf]) -> Result<()> {
        if self.verdict == Verdict::Trusted {
            self.verdict = self.checker.loaded(files);
            self.decide()?;
        }
        Ok(())
    }

    fn decide(&self) -> Result<()> {
        let Verdict::Untrusted(doubt) = &self.verdict else {
            return Ok(());
        };
        if self.enforce && !python_trust::overridden() {
            return Err(Error::UntrustedInterpreter {
                path: self.executable.to_path_buf(),
                step: doubt.path.clone(),
                reason: doubt.reason.clone(),
            });
        }
        if self.enforce {
            tracing::warn!(
                "running `{}` although `{}` {} ({}): what it compiles serves no other interpreter",
                self.executable.display(),
                doubt.path.display(),
                doubt.reason,
                python_trust::OVERRIDE_FLAG,
            );
        }
        Ok(())
    }

    fn apply(self, mut interpreter: Interpreter) -> Interpreter {
        interpreter.key_domain = self.verdict.key_domain(self.executable, self.identity);
        interpreter
    }
}

/// Finds the interpreter of a venv, conda env or CPython install.
pub fn find_in_prefix(prefix: &Path) -> Result<PathBuf> {
    let bin = prefix.join("bin");
    for name in ["python3", "python", "pypy3", "pypy"] {
        let candidate = bin.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    // A CPython install may only have bin/python3.N.
    if let Ok(entries) = std::fs::read_dir(&bin) {
        let mut versioned: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("python3.") && n[8..].chars().all(|c| c.is_ascii_digit())
                })
            })
            .filter(|p| is_executable(p))
            .collect();
        versioned.sort();
        if let Some(found) = versioned.pop() {
            return Ok(found);
        }
    }
    Err(Error::NoInterpreter {
        prefix: prefix.to_path_buf(),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

mod magic_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(magic: &[u8; 4], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::util::hex(magic))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 4], D::Error> {
        let s = String::deserialize(d)?;
        super::decode_hex(&s)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom(format!("bad magic `{s}`")))
    }
}
