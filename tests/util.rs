//! The test harness: a private directory per test, a command builder for the
//! binary, the interpreters of this machine, and readers of `python -v`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};

/// Fails with the command's full output when `$cond` is false.
macro_rules! assert_output {
    ($out:expr, $cond:expr, $($msg:tt)+) => {{
        let out: &std::process::Output = &$out;
        if !$cond {
            panic!(
                "{}\n--- status: {}\n--- stdout:\n{}\n--- stderr:\n{}",
                format!($($msg)+),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }};
}

/// A private directory for one test, with a store inside.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("pycstore-test-")
            .tempdir()
            .expect("temp dir");
        TestDir { dir }
    }

    /// A test dir on a given filesystem root (e.g. a loop-mounted XFS).
    pub fn new_in(root: &Path) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("pycstore-test-")
            .tempdir_in(root)
            .expect("temp dir");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn store(&self) -> PathBuf {
        self.join("store")
    }

    /// Writes a file, creating its parent directories.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// `pycstore --store <this dir's store>`.
    pub fn pycstore(&self) -> Command {
        pycstore(&self.store())
    }
}

/// The binary under test, with a given store.
pub fn pycstore(store: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pycstore"));
    cmd.arg("--store").arg(store);
    cmd.env_remove("PYCSTORE_DIR");
    // No user's config file or settings in the environment.
    cmd.env("PYCSTORE_CONFIG", "/dev/null");
    for var in [
        "PYCSTORE_LINK_MODE",
        "PYCSTORE_JOBS",
        "PYCSTORE_INVALIDATION_MODE",
        "PYCSTORE_EXCLUDE",
        "PYCSTORE_IO_URING",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs a command, returning its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert_output!(out, out.status.success(), "command failed: {cmd:?}");
    out
}

/// Runs `pycstore link ... --json` and returns the parsed summary.
pub fn link_json(cmd: &mut Command) -> (Output, serde_json::Value) {
    let out = run(cmd.arg("--json"));
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON from {cmd:?}: {e}\n--- stdout:\n{}\n--- stderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

/// The interpreter the tests use for `version` ("3.11", or "pypy3.9"),
/// the first of:
///
/// 1. the path in `PYCSTORE_TEST_PYTHON_3_11` (`PYCSTORE_TEST_PYTHON_PYPY_3_9`
///    for PyPy: see [`python_var`]);
/// 2. `python3.11` (for PyPy `pypy3`, then `pypy3.9`) on `PATH`, when it runs
///    and is that version: the interpreter it runs (its `sys.executable`, so
///    a pyenv shim names the real interpreter, and a shim of a version pyenv
///    has not made active is passed over);
/// 3. for CPython, the newest `versions/3.11.*/bin/python3.11` under the pyenv
///    root (`$PYENV_ROOT`, else what `pyenv root` says, else `~/.pyenv`).
///
/// A missing one is a failure naming these (`scripts/find-python` looks in
/// the same order). Found once per test process.
pub fn python(version: &str) -> PathBuf {
    static FOUND: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut found = FOUND.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = found.get(version) {
        return p.clone();
    }
    let p = find_python(version).unwrap_or_else(|e| panic!("{e}"));
    found.insert(version.to_owned(), p.clone());
    p
}

/// The variable that names the interpreter for `version`:
/// `PYCSTORE_TEST_PYTHON_3_11` for "3.11", `PYCSTORE_TEST_PYTHON_PYPY_3_9`
/// for "pypy3.9".
pub fn python_var(version: &str) -> String {
    let name = version.replace("pypy", "pypy_").replace('.', "_");
    format!("PYCSTORE_TEST_PYTHON_{}", name.to_uppercase())
}

/// [`python`]'s search, or a message saying where it looked.
fn find_python(version: &str) -> Result<PathBuf, String> {
    let var = python_var(version);
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!("{var}={} is not an executable file", p.display()))
        };
    }
    let (language, names, what) = match version.strip_prefix("pypy") {
        Some(v) => (v, vec!["pypy3".to_owned(), version.to_owned()], "PyPy"),
        None => (version, vec![format!("python{version}")], "CPython"),
    };
    let mut passed_over = Vec::new();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in &names {
            let candidate = dir.join(name);
            if !is_executable(&candidate) {
                continue;
            }
            match probe_python(&candidate, language) {
                Some(exe) => return Ok(exe),
                None => passed_over.push(candidate.display().to_string()),
            }
        }
    }
    let mut looked = format!("{} on PATH", names.join(" or "));
    if what == "CPython" {
        let versions = pyenv_root().join("versions");
        if let Some(exe) = newest_pyenv_python(&versions, version) {
            return Ok(exe);
        }
        looked += &format!(", {}/{version}.*", versions.display());
    }
    let passed_over = if passed_over.is_empty() {
        String::new()
    } else {
        format!(
            " (passed over, as not running {what} {language}: {})",
            passed_over.join(", ")
        )
    };
    Err(format!(
        "{what} {language} not found: set {var} to its path, or put {} on PATH{}; \
         looked at {var}, {looked}{passed_over}",
        names[0],
        if what == "CPython" {
            ", or install it with pyenv"
        } else {
            " (scripts/setup installs pypy3)"
        },
    ))
}

/// The interpreter `candidate` runs (its `sys.executable`), when it runs
/// and its language version is `language` ("3.11").
fn probe_python(candidate: &Path, language: &str) -> Option<PathBuf> {
    let code = "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)";
    let out = Command::new(candidate)
        .args(["-I", "-c", code])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let stdout = String::from_utf8(out.stdout).ok()?;
    let mut lines = stdout.lines();
    if !out.status.success() || lines.next() != Some(language) {
        return None;
    }
    match lines.next().map(PathBuf::from) {
        Some(exe) if is_executable(&exe) => Some(exe),
        _ => Some(candidate.to_owned()),
    }
}

/// pyenv's root: `$PYENV_ROOT`, else what `pyenv root` says, else
/// `~/.pyenv`.
fn pyenv_root() -> PathBuf {
    if let Some(root) = std::env::var_os("PYENV_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(root);
    }
    let said = Command::new("pyenv")
        .arg("root")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    match said {
        Some(root) => PathBuf::from(root),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pyenv"),
    }
}

/// The newest `VERSIONS/X.Y.*/bin/pythonX.Y` (3.11.10 is newer than 3.11.9).
fn newest_pyenv_python(versions: &Path, version: &str) -> Option<PathBuf> {
    let prefix = format!("{version}.");
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(versions)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let patch: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            let exe = e.path().join("bin").join(format!("python{version}"));
            is_executable(&exe).then_some((patch, exe))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, exe)| exe)
}

/// Whether `path` is a file someone may execute.
fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Creates a venv with pip (installed offline from the interpreter's bundled
/// wheel) and removes every pyc the installer wrote.
pub fn make_venv(python: &Path, dest: &Path) {
    run_ok(Command::new(python).args(["-m", "venv"]).arg(dest));
    remove_pycache(dest);
}

/// Removes every `__pycache__` below `root`.
pub fn remove_pycache(root: &Path) {
    let dirs: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_dir() && e.file_name() == "__pycache__")
        .map(|e| e.into_path())
        .collect();
    for d in dirs {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// What `python -v` said about how modules were loaded.
#[derive(Debug)]
pub struct ImportLog {
    /// Modules loaded from a pyc: `# code object from '…pyc'`.
    pub from_pyc: Vec<String>,
    /// Modules compiled from source: `# code object from ….py`.
    pub from_source: Vec<String>,
    pub output: Output,
}

/// Runs `python -v ARGS` with bytecode writing allowed (this machine sets
/// PYTHONDONTWRITEBYTECODE in every shell) and parses what it loaded.
pub fn python_v(python: &Path, args: &[&str], envs: &[(&str, &OsStr)]) -> ImportLog {
    python_v_with(Command::new(python), args, envs)
}

/// [`python_v`] with the interpreter already in `cmd` (run as another user,
/// say).
pub fn python_v_with(mut cmd: Command, args: &[&str], envs: &[(&str, &OsStr)]) -> ImportLog {
    cmd.arg("-v")
        .args(args)
        .env_remove("PYTHONDONTWRITEBYTECODE");
    cmd.env_remove("PYTHONPYCACHEPREFIX");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let output = run(&mut cmd);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut from_pyc = Vec::new();
    let mut from_source = Vec::new();
    for line in stderr.lines() {
        if let Some(rest) = line.strip_prefix("# code object from ") {
            if rest.starts_with('\'') {
                from_pyc.push(rest.trim_matches('\'').to_string());
            } else {
                from_source.push(rest.to_string());
            }
        }
    }
    ImportLog {
        from_pyc,
        from_source,
        output,
    }
}

/// Asserts that modules under `root` were imported, all from pycs.
pub fn assert_nothing_compiled(log: &ImportLog, root: &Path, at_least: usize) {
    let root = root.to_str().unwrap();
    let under: Vec<_> = log
        .from_pyc
        .iter()
        .filter(|p| p.starts_with(root))
        .collect();
    let compiled: Vec<_> = log
        .from_source
        .iter()
        .filter(|p| p.starts_with(root))
        .collect();
    assert_output!(
        log.output,
        log.output.status.success() && compiled.is_empty() && under.len() >= at_least,
        "expected >= {at_least} modules under {root} loaded from pycs and none compiled; \
         from pycs: {}, compiled from source: {compiled:#?}",
        under.len()
    );
}

/// Every `.pyc` below `root`, relative to it, sorted.
pub fn pycs_under(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.path().extension() == Some(OsStr::new("pyc")))
        .map(|e| e.path().strip_prefix(root).unwrap().to_path_buf())
        .collect();
    v.sort();
    v
}

/// Names the file [`skip`] appends a line to for each skipped test
/// (`scripts/test` sets it and prints how many were skipped, and why).
pub const SKIPPED_LOG_ENV: &str = "PYCSTORE_TEST_SKIPPED_LOG";

/// Why this run may not skip a test, if it may not: `CI` is set (to
/// anything but "" , "0" or "false"; `.ci/run` sets `CI=true`), or
/// `PYCSTORE_TEST_REQUIRE_FS` is (`scripts/test` sets it once it has made
/// the test filesystems).
fn skipping_forbidden() -> Option<String> {
    if let Some(ci) = std::env::var_os("CI") {
        if !["", "0", "false"].contains(&ci.to_string_lossy().to_lowercase().as_str()) {
            return Some(format!("CI={}", ci.to_string_lossy()));
        }
    }
    std::env::var_os("PYCSTORE_TEST_REQUIRE_FS")
        .map(|_| "PYCSTORE_TEST_REQUIRE_FS is set".to_owned())
}

/// A test cannot run here because `why` (which says what is missing and how
/// to provide it). Under CI, or with `PYCSTORE_TEST_REQUIRE_FS`, that is a
/// failure. Otherwise the test is skipped: this says "SKIPPED" on stderr,
/// appends `TEST<tab>WHY` to the file named by [`SKIPPED_LOG_ENV`] when set,
/// and the caller returns.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if let Some(reason) = skipping_forbidden() {
        panic!(
            "{test} cannot run here: {why}\n({reason}: a test whose prerequisite is missing \
             fails instead of skipping)"
        );
    }
    eprintln!("SKIPPED {test}: {why}");
    if let Some(log) = std::env::var_os(SKIPPED_LOG_ENV) {
        // One write of one line to a file opened for appending: lines of
        // tests running in parallel do not interleave.
        let line = format!("{test}\t{}\n", why.replace('\n', " "));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", Path::new(&log).display()));
    }
}

/// The mounted test filesystem named by `var` (set up by
/// `scripts/test-filesystems`), or [`skip`].
pub fn test_fs(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if Path::new(&p).is_dir() => Some(PathBuf::from(p)),
        _ => {
            skip(&format!(
                "{var} is not set or not a directory: run \
                 `eval \"$(scripts/test-filesystems up)\"` as root"
            ));
            None
        }
    }
}

/// The corpus named by `var` (built by `scripts/test-corpora`, which prints
/// the variables), or [`skip`].
pub fn test_corpus(var: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(var).map(PathBuf::from);
    // scripts/test-corpora marks a complete corpus with DIR.done.
    let done = |d: &Path| {
        let mut marker = d.as_os_str().to_owned();
        marker.push(".done");
        d.is_dir() && Path::new(&marker).exists()
    };
    match dir {
        Some(d) if done(&d) => Some(d),
        _ => {
            skip(&format!(
                "{var} names no corpus built by scripts/test-corpora: run \
                 `eval \"$(scripts/test-corpora)\"`"
            ));
            None
        }
    }
}

/// Debian's CPython 3.11, which an unprivileged user can run (pyenv's live
/// under root's home, mode 0700): the interpreter of every test that runs
/// something as `nobody`.
pub fn system_python() -> PathBuf {
    let p = PathBuf::from("/usr/bin/python3.11");
    assert!(
        p.exists(),
        "{} is missing: scripts/setup installs python3.11",
        p.display()
    );
    p
}

/// `cmd` run under a limit of `limit` open files (soft and hard: a link
/// cannot raise it).
pub fn with_open_file_limit(cmd: &Command, limit: u32) -> Command {
    let mut limited = Command::new("prlimit");
    limited
        .arg(format!("--nofile={limit}:{limit}"))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => limited.env(key, value),
            None => limited.env_remove(key),
        };
    }
    limited
}
