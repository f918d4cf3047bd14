//! `pycstore mount` over the real corpora `scripts/test-corpora` builds: the
//! reference corpus for CPython 3.11, the same packages for 3.13, and their
//! pure-Python part for PyPy 3.9. A read-only copy of each, and a read-only
//! loop-mounted ext4 filesystem holding the 3.11 one, import the corpus
//! import workload (tests/corpus/import-workload.py) and stdlib modules
//! through the overlay (`--over`) and through the pycache-prefix view with
//! nothing compiled from source; afterwards the prefix is still mounted as it
//! was, byte for byte unchanged, with no pyc in it. (The stdlib through the
//! overlay: `overlay_over_an_interpreter_install_*` in tests/fuse.rs.)
//!
//! These tests need what tests/fuse.rs needs, the corpora (`scripts/test`
//! builds them; by hand: `eval "$(scripts/test-corpora)"`) and, for the
//! loop-mounted one, loop devices and mkfs.ext4. Without them they say
//! "skipped" (and `scripts/test` counts them), unless `CI` or
//! `PYCSTORE_TEST_REQUIRE_FS` is set, where they fail: see `util::skip`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::fuse::{
    assert_served_by_prefix, fuse_available, reported, tree_hash, venv_python, Mounted, ReadOnly,
};
use crate::util::*;

/// The corpus import workload: it imports the 370 modules listed in its
/// `MODULES`.
const WORKLOAD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/corpus/import-workload.py"
);

/// Standard library modules imported before the workload's.
const STDLIB: &str = "json, email.parser, http.client, asyncio, decimal, argparse, \
    logging.handlers, xml.etree.ElementTree, zipfile, csv";

/// A corpus, what its workload imports, and how much of it must load from
/// pycs.
struct Corpus {
    /// The variable naming it (printed by `scripts/test-corpora`).
    var: &'static str,
    /// The workload's modules in these top-level packages; all when empty.
    packages: &'static [&'static str],
    /// Workload modules this corpus does not have.
    absent: &'static [&'static str],
    /// How many workload modules that leaves.
    workload: usize,
    /// At least this many modules of the corpus load from pycs: a little
    /// under what the workload loads here (3.11: 2247, 3.13: 2124, PyPy:
    /// 1025).
    modules: usize,
    /// At least this many stdlib modules load from the pycache-prefix view
    /// (3.11: 212, 3.13: 216, PyPy: 222).
    stdlib: usize,
}

const CPYTHON_3_11: Corpus = Corpus {
    var: "PYCSTORE_TEST_CORPUS_CPYTHON_3_11",
    packages: &[],
    absent: &[],
    workload: 370,
    modules: 2200,
    stdlib: 200,
};

const CPYTHON_3_13: Corpus = Corpus {
    var: "PYCSTORE_TEST_CORPUS_CPYTHON_3_13",
    packages: &[],
    // NumPy has no numpy.distutils on Python >= 3.12.
    absent: &["numpy.distutils"],
    workload: 369,
    modules: 2080,
    stdlib: 200,
};

const PYPY_3_9: Corpus = Corpus {
    var: "PYCSTORE_TEST_CORPUS_PYPY_3_9",
    // tests/corpus/pypy3.9-requirements.txt: the pure-Python packages.
    packages: &[
        "asgiref",
        "cycler",
        "dateutil",
        "django",
        "fontTools",
        "mpmath",
        "packaging",
        "pyparsing",
        "sqlparse",
        "sympy",
    ],
    // Newer than fonttools 4.60.2, the last release for Python 3.9.
    absent: &["fontTools.diff"],
    workload: 159,
    modules: 1000,
    stdlib: 200,
};

impl Corpus {
    /// The workload's modules this corpus imports.
    fn modules(&self) -> Vec<String> {
        let text = std::fs::read_to_string(WORKLOAD).unwrap_or_else(|e| panic!("{WORKLOAD}: {e}"));
        let list = text
            .split_once("MODULES = \"\"\"")
            .and_then(|(_, rest)| rest.split_once("\"\"\""))
            .map(|(list, _)| list)
            .unwrap_or_else(|| panic!("no MODULES = \"\"\"...\"\"\" in {WORKLOAD}"));
        let all: Vec<&str> = list.split_whitespace().collect();
        for absent in self.absent {
            assert!(all.contains(absent), "{absent} is not in {WORKLOAD}");
        }
        let modules: Vec<String> = all
            .into_iter()
            .filter(|m| {
                let top = m.split('.').next().unwrap();
                self.packages.is_empty() || self.packages.contains(&top)
            })
            .filter(|m| !self.absent.contains(m))
            .map(String::from)
            .collect();
        assert_eq!(modules.len(), self.workload, "{WORKLOAD} changed");
        modules
    }

    /// Runs the workload under `python -v` the way its docstring says
    /// (MPLBACKEND=Agg, -W ignore), after the stdlib modules: the file
    /// itself when the corpus has all its modules, else its loop over the
    /// modules the corpus has. Checks that it ran to the end.
    fn run(&self, python: &Path, envs: &[(&str, &OsStr)]) -> ImportLog {
        let modules = self.modules();
        let code = if self.packages.is_empty() && self.absent.is_empty() {
            format!(
                "import {STDLIB}\nimport runpy\n\
                 runpy.run_path({WORKLOAD:?}, run_name='__main__')\n"
            )
        } else {
            format!(
                "import importlib\nimport {STDLIB}\nMODULES = {modules:?}\n\
                 for name in MODULES:\n    importlib.import_module(name)\n\
                 print(f'imported {{len(MODULES)}} modules')\n"
            )
        };
        let mut envs = envs.to_vec();
        envs.push(("MPLBACKEND", OsStr::new("Agg")));
        let log = python_v(python, &["-W", "ignore", "-c", &code], &envs);
        let done = format!("imported {} modules", modules.len());
        assert_output!(
            log.output,
            log.output.status.success()
                && String::from_utf8_lossy(&log.output.stdout).contains(&done),
            "the workload did not run to the end"
        );
        log
    }
}

/// The line of /proc/self/mountinfo of the topmost mount at `path`, if any.
fn top_mount(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap();
    let at: Vec<&str> = info
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(want))
        .collect();
    // The one no other mount at `path` sits on.
    at.iter()
        .find(|l| {
            let id = l.split(' ').next();
            !at.iter().any(|other| other.split(' ').nth(1) == id)
        })
        .map(|l| l.to_string())
}

/// The interpreter's stdlib directory.
fn stdlib_dir(python: &Path) -> PathBuf {
    let out = run_ok(Command::new(python).args([
        "-I",
        "-c",
        "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
    ]));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The overlay mounted over the read-only `prefix` with `store` (empty: the
/// mount compiles): the workload imports twice with nothing under the
/// prefix compiled from source; unmounting leaves the read-only mount that
/// was there before.
fn overlay(t: &TestDir, store: &Path, corpus: &Corpus, prefix: &Path) {
    let under = top_mount(prefix).expect("the prefix is a read-only mount");
    let mut m = Mounted::start(
        t,
        store,
        prefix,
        &[OsStr::new("--over"), prefix.as_os_str()],
    );
    for _ in 0..2 {
        let log = corpus.run(&venv_python(prefix), &[]);
        assert_nothing_compiled(&log, prefix, corpus.modules);
    }
    let report = m.unmount();
    // Identical sources (the empty __init__.py files) share one compile.
    assert!(
        reported(&report, "compiled on first access") as usize > corpus.modules / 2,
        "{report}"
    );
    assert_eq!(
        top_mount(prefix).as_ref(),
        Some(&under),
        "unmounting the overlay did not leave the prefix's own mount"
    );
}

/// The pycache-prefix view for the corpus's interpreter with `store`, which
/// the overlay filled with the corpus's pycs: the workload and the stdlib
/// import with nothing compiled from source, all from pycs under the view;
/// the first mount compiles only stdlib modules, a second one nothing.
fn pycache_prefix_view(t: &TestDir, store: &Path, corpus: &Corpus, prefix: &Path) {
    let python = venv_python(prefix);
    let stdlib = stdlib_dir(&python);
    let cache = t.join("pycache");
    std::fs::create_dir_all(&cache).unwrap();
    let env = [("PYTHONPYCACHEPREFIX", cache.as_os_str())];
    let args = [
        OsStr::new("--pycache-prefix"),
        cache.as_os_str(),
        OsStr::new("--python"),
        python.as_os_str(),
    ];
    let served = |log: &ImportLog| {
        assert_output!(
            log.output,
            log.from_source.is_empty(),
            "compiled from source: {:#?}",
            log.from_source
        );
        assert_served_by_prefix(log, &cache, prefix, corpus.modules);
        assert_served_by_prefix(log, &cache, &stdlib, corpus.stdlib);
    };

    let mut m = Mounted::start(t, store, &cache, &args);
    let log = corpus.run(&python, &env);
    served(&log);
    let mirrored = cache.join(prefix.strip_prefix("/").unwrap());
    let not_corpus = log
        .from_pyc
        .iter()
        .filter(|p| !Path::new(p).starts_with(&mirrored))
        .count();
    let report = m.unmount();
    assert!(
        reported(&report, "compiled on first access") as usize <= not_corpus,
        "the corpus's pycs were compiled again ({not_corpus} modules outside it): {report}"
    );

    let mut m = Mounted::start(t, store, &cache, &args);
    served(&corpus.run(&python, &env));
    let report = m.unmount();
    assert_eq!(reported(&report, "compiled on first access"), 0, "{report}");
}

/// A read-only copy of the corpus (a read-only bind mount): the workload
/// imports through the overlay, then through the pycache-prefix view, with
/// nothing compiled from source; the copy is unchanged and holds no pyc.
fn corpus_views(corpus: &Corpus) {
    if !fuse_available() {
        return;
    }
    let Some(source) = test_corpus(corpus.var) else {
        return;
    };
    let t = TestDir::new();
    let prefix = t.join("corpus");
    run_ok(Command::new("cp").arg("-a").arg(&source).arg(&prefix));
    let before = tree_hash(&prefix);
    let ro = ReadOnly::new(&prefix);
    overlay(&t, &t.store(), corpus, &prefix);
    pycache_prefix_view(&t, &t.store(), corpus, &prefix);
    ro.release();
    assert!(pycs_under(&prefix).is_empty());
    assert_eq!(tree_hash(&prefix), before, "the prefix changed");
}

#[test]
fn corpus_cpython_3_11() {
    corpus_views(&CPYTHON_3_11);
}

#[test]
fn corpus_cpython_3_13() {
    corpus_views(&CPYTHON_3_13);
}

#[test]
fn corpus_pypy_3_9() {
    corpus_views(&PYPY_3_9);
}

/// Whether loop devices and mkfs.ext4 can be used here; says "skipped" when
/// not.
fn loop_available() -> bool {
    let free = Command::new("losetup")
        .arg("-f")
        .output()
        .is_ok_and(|o| o.status.success());
    let mkfs = Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if free && mkfs {
        return true;
    }
    skip("this test needs a free loop device and mkfs.ext4 (e2fsprogs)");
    false
}

/// The loop devices attached to `image`.
fn loop_devices(image: &Path) -> Vec<String> {
    let out = run_ok(
        Command::new("losetup")
            .args(["-n", "-O", "NAME", "-j"])
            .arg(image),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// A filesystem image mounted read-only on a loop device by `mount -o
/// ro,loop` (whose device detaches itself on unmount). On drop, unmounted
/// if still mounted from the image, and any loop device still attached to
/// the image detached.
struct LoopMount {
    image: PathBuf,
    dir: PathBuf,
}

impl LoopMount {
    fn new(image: &Path, dir: &Path) -> LoopMount {
        run_ok(
            Command::new("mount")
                .args(["-o", "ro,loop"])
                .arg(image)
                .arg(dir),
        );
        let guard = LoopMount {
            image: image.to_path_buf(),
            dir: dir.to_path_buf(),
        };
        assert!(guard.mounted(), "{} is not mounted", dir.display());
        assert!(
            std::fs::write(dir.join("probe"), "x").is_err(),
            "`{}` is writable",
            dir.display()
        );
        guard
    }

    /// Whether the topmost mount at `dir` is from a loop device on `image`.
    fn mounted(&self) -> bool {
        let devices = loop_devices(&self.image);
        top_mount(&self.dir).is_some_and(|line| {
            let source = line.split(" - ").nth(1).and_then(|r| r.split(' ').nth(1));
            source.is_some_and(|s| devices.iter().any(|d| d == s))
        })
    }

    /// Unmounts, and checks that no loop device is left attached to the
    /// image.
    fn unmount(self) {
        run_ok(Command::new("umount").arg(&self.dir));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !loop_devices(&self.image).is_empty() {
            assert!(
                Instant::now() < deadline,
                "loop devices still attached to {} after unmounting: {:?}",
                self.image.display(),
                loop_devices(&self.image)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted() {
            let out = Command::new("umount").arg(&self.dir).output();
            if !out.is_ok_and(|o| o.status.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
            }
        }
        for device in loop_devices(&self.image) {
            let _ = Command::new("losetup").arg("-d").arg(device).output();
        }
    }
}

/// The CPython 3.11 corpus on a read-only ext4 filesystem on a loop device:
/// the workload imports through the overlay mounted over the filesystem's
/// mount point, then through the pycache-prefix view, with nothing compiled
/// from source; the filesystem is still mounted, unchanged and without a
/// pyc, and unmounting it leaves no loop device behind.
#[test]
fn corpus_on_read_only_loop_filesystem_cpython_3_11() {
    if !fuse_available() || !loop_available() {
        return;
    }
    let Some(source) = test_corpus(CPYTHON_3_11.var) else {
        return;
    };
    let t = TestDir::new();
    let bytes: u64 = walkdir::WalkDir::new(&source)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    // Room for the files' last blocks and the metadata.
    let size = format!("{}M", bytes * 3 / 2 / (1 << 20) + 64);
    let image = t.join("corpus.ext4");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-d"])
            .arg(&source)
            .arg(&image)
            .arg(&size),
    );
    let prefix = t.join("corpus");
    std::fs::create_dir(&prefix).unwrap();
    let fs = LoopMount::new(&image, &prefix);
    let before = tree_hash(&prefix);
    overlay(&t, &t.store(), &CPYTHON_3_11, &prefix);
    pycache_prefix_view(&t, &t.store(), &CPYTHON_3_11, &prefix);
    assert!(fs.mounted(), "the filesystem is no longer mounted");
    assert!(pycs_under(&prefix).is_empty());
    assert_eq!(tree_hash(&prefix), before, "the filesystem changed");
    fs.unmount();
}
