//! The test harness: a private directory per test, a command builder for the
//! binary, the interpreters of this machine, and readers of `python -v`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// The interpreters the product is tested with. A missing one is a failure:
/// `.ci/run` installs them.
pub fn python(version: &str) -> PathBuf {
    if version == "pypy3.9" {
        let p = PathBuf::from("/usr/bin/pypy3");
        assert!(
            p.exists(),
            "pypy3 is missing: `apt-get install pypy3` (scripts/setup does)"
        );
        return p;
    }
    let versions = Path::new("/root/.pyenv/versions");
    let mut found: Vec<PathBuf> = std::fs::read_dir(versions)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", versions.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with(&format!("{version}.")))
        })
        .collect();
    found.sort();
    let dir = found
        .pop()
        .unwrap_or_else(|| panic!("CPython {version} is missing under {}", versions.display()));
    dir.join("bin").join(format!("python{version}"))
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
    let mut cmd = Command::new(python);
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

/// A test cannot run here because `why`: fails when PYCSTORE_TEST_REQUIRE_FS
/// is set (as in CI, where everything it needs is set up), else says
/// "SKIPPED" loudly and lets the test return.
pub fn skip(why: &str) {
    assert!(
        std::env::var_os("PYCSTORE_TEST_REQUIRE_FS").is_none(),
        "{why}, and PYCSTORE_TEST_REQUIRE_FS is set"
    );
    eprintln!("SKIPPED: {why}");
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
