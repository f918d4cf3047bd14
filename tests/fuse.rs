//! `pycstore mount`: read-only prefixes import everything from pycs served
//! through FUSE (the overlay view and the pycache-prefix view), stay byte
//! for byte unchanged, and keep being served while `link` and `gc` use the
//! same store; `pycstore unmount` and SIGTERM end the server, and a dead
//! server makes the mount point fail instead of hang.
//!
//! These tests need /dev/fuse, `fusermount3` and root (for read-only bind
//! mounts); without them they say "skipped" (and `scripts/test` counts
//! them), unless `CI` or `PYCSTORE_TEST_REQUIRE_FS` is set, where they fail:
//! see `util::skip`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::util::*;

/// Modules of pip that pull in a few hundred files, vendored packages included.
pub(crate) const PIP_IMPORTS: &str =
    "import pip._internal.cli.main, pip._internal.commands.install, \
    pip._vendor.packaging.version, pip._vendor.rich.console, pip._vendor.requests";

/// Whether FUSE mounts can be tested here; says "skipped" when not.
pub(crate) fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fusermount = Command::new("fusermount3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && fusermount && Path::new("/dev/fuse").exists() {
        return true;
    }
    skip("FUSE tests need root, /dev/fuse and fusermount3 (apt-get install fuse3)");
    false
}

/// Whether /proc/self/mountinfo lists a pycstore mount at `path`.
pub(crate) fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap();
    info.lines().any(|line| {
        let (left, right) = line.split_once(" - ").unwrap_or(("", ""));
        left.split(' ').nth(4) == Some(want) && right.contains(" pycstore ")
    })
}

/// A running `pycstore mount`, unmounted (and its server waited for) on drop.
pub(crate) struct Mounted {
    child: Option<Child>,
    mountpoint: PathBuf,
    store: PathBuf,
    stderr: PathBuf,
}

impl Mounted {
    /// Starts `pycstore mount ARGS` in the background and waits until the
    /// mount is up.
    pub(crate) fn start(t: &TestDir, store: &Path, mountpoint: &Path, args: &[&OsStr]) -> Mounted {
        let mut cmd = pycstore(store);
        cmd.arg("mount").args(args);
        Mounted::spawn(t, cmd, store, mountpoint)
    }

    /// Starts `cmd` (a `pycstore --store STORE mount ...`) in the background
    /// and waits until the mount is up.
    pub(crate) fn spawn(t: &TestDir, mut cmd: Command, store: &Path, mountpoint: &Path) -> Mounted {
        static MOUNTS: AtomicUsize = AtomicUsize::new(0);
        let stderr = t.join(format!(
            "mount-{}.stderr",
            MOUNTS.fetch_add(1, Ordering::Relaxed)
        ));
        let child = cmd
            .env_remove("PYTHONPYCACHEPREFIX")
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("start pycstore mount");
        let mut m = Mounted {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            store: store.to_path_buf(),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mounted(mountpoint) {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("pycstore mount exited with {status}:\n{}", m.log());
            }
            assert!(
                Instant::now() < deadline,
                "no mount after 60s:\n{}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the server to exit by itself; returns its stderr.
    fn wait(&mut self, within: Duration) -> String {
        let mut child = self.child.take().expect("server still running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let log = self.log();
                assert!(status.success(), "the server exited with {status}:\n{log}");
                return log;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not exit within {within:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `pycstore unmount`, then the server's final report.
    pub(crate) fn unmount(&mut self) -> String {
        run_ok(pycstore(&self.store).arg("unmount").arg(&self.mountpoint));
        assert!(!is_mounted(&self.mountpoint));
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = pycstore(&self.store)
                .args(["unmount", "--lazy"])
                .arg(&self.mountpoint)
                .output();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A directory made read-only by a read-only bind mount over itself,
/// released by [`ReadOnly::release`] (or, in a failing test, on drop).
pub(crate) struct ReadOnly(Option<PathBuf>);

impl ReadOnly {
    pub(crate) fn new(dir: &Path) -> ReadOnly {
        run_ok(Command::new("mount").arg("--bind").arg(dir).arg(dir));
        let guard = ReadOnly(Some(dir.to_path_buf()));
        run_ok(
            Command::new("mount")
                .args(["-o", "remount,ro,bind"])
                .arg(dir),
        );
        assert!(
            std::fs::write(dir.join("probe"), "x").is_err(),
            "`{}` is still writable",
            dir.display()
        );
        guard
    }

    /// Unmounts the bind mount, which must not be busy: nothing the view
    /// started (a compile worker running the prefix's own interpreter) may
    /// outlive the view.
    pub(crate) fn release(mut self) {
        let dir = self.0.take().expect("released once");
        run_ok(Command::new("umount").arg(&dir));
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = Command::new("umount").arg(&dir).output();
        }
    }
}

/// blake3 of a tree: every path, type, mode, size, symlink target and file
/// content, in order.
pub(crate) fn tree_hash(root: &Path) -> String {
    let mut h = blake3::Hasher::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.unwrap();
        let meta = entry.path().symlink_metadata().unwrap();
        h.update(entry.path().as_os_str().as_encoded_bytes());
        h.update(&meta.mode().to_le_bytes());
        h.update(&meta.mtime().to_le_bytes());
        if meta.file_type().is_symlink() {
            h.update(
                std::fs::read_link(entry.path())
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        } else if meta.is_file() {
            h.update(&std::fs::read(entry.path()).unwrap());
        } else {
            assert!(!meta.file_type().is_fifo());
        }
    }
    h.finalize().to_hex().to_string()
}

pub(crate) fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// The number in the server's final report before `what`.
pub(crate) fn reported(log: &str, what: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("unmounted"))
        .unwrap_or_else(|| panic!("no final report:\n{log}"));
    let before = line
        .split(what)
        .next()
        .unwrap_or_else(|| panic!("no `{what}` in {line}"));
    before
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count before `{what}` in {line}"))
}

/// Asserts that modules under `root` were imported from pycs under the
/// pycache prefix (`PREFIX/ROOT`), none compiled from source.
pub(crate) fn assert_served_by_prefix(
    log: &ImportLog,
    prefix: &Path,
    root: &Path,
    at_least: usize,
) {
    assert_nothing_compiled(log, root, 0);
    let mirrored = prefix.join(root.strip_prefix("/").unwrap());
    assert_nothing_compiled(log, &mirrored, at_least);
}

/// `prefix` made read-only, with the overlay mounted over it on a fresh
/// store: the view lists pycs, and `code` imports twice with at least
/// `at_least` modules under the prefix loaded from pycs and none compiled
/// from source; the mount compiled them on first access, and unmounting
/// leaves the prefix byte for byte as it was, without a pyc.
fn imports_through_overlay_over(prefix: &Path, python: &Path, code: &str, at_least: usize) {
    let t = TestDir::new();
    let before = tree_hash(prefix);
    let ro = ReadOnly::new(prefix);
    let mut m = Mounted::start(
        &t,
        &t.store(),
        prefix,
        &[OsStr::new("--over"), prefix.as_os_str()],
    );
    for _ in 0..2 {
        let log = python_v(python, &["-c", code], &[]);
        assert_nothing_compiled(&log, prefix, at_least);
    }
    let pycs = pycs_under(prefix);
    assert!(pycs.len() > at_least, "the overlay lists no pycs: {pycs:?}");
    let report = m.unmount();
    assert!(
        reported(&report, "compiled on first access") as usize > at_least,
        "{report}"
    );
    ro.release();
    assert!(pycs_under(prefix).is_empty());
    assert_eq!(tree_hash(prefix), before, "the prefix changed");
}

/// A venv, read-only, with the overlay over it: pip imports from pycs.
fn overlay_over_read_only_venv(version: &str) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let venv = t.join("venv");
    make_venv(&python(version), &venv);
    imports_through_overlay_over(&venv, &venv_python(&venv), PIP_IMPORTS, 100);
}

#[test]
fn overlay_cpython_3_11() {
    overlay_over_read_only_venv("3.11");
}

#[test]
fn overlay_cpython_3_13() {
    overlay_over_read_only_venv("3.13");
}

#[test]
fn overlay_pypy_3_9() {
    overlay_over_read_only_venv("pypy3.9");
}

/// An interpreter's own install, read-only, with the overlay over it: the
/// stdlib imports from pycs compiled by workers running that same
/// interpreter (which must neither wait on the mount nor keep it busy), and
/// a plain unmount succeeds.
fn overlay_over_an_interpreter_install(version: &str) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let install = t.join("install");
    let py = copy_install(&python(version), &install);
    let code = "import json, email.parser, http.client, asyncio, decimal";
    imports_through_overlay_over(&install, &py, code, 50);
}

#[test]
fn overlay_over_an_interpreter_install_cpython_3_11() {
    overlay_over_an_interpreter_install("3.11");
}

#[test]
fn overlay_over_an_interpreter_install_cpython_3_13() {
    overlay_over_an_interpreter_install("3.13");
}

#[test]
fn overlay_over_an_interpreter_install_pypy_3_9() {
    overlay_over_an_interpreter_install("pypy3.9");
}

/// Copies the install of the interpreter `exe` into `dest` so that the copy
/// runs on its own: the executable into `dest/bin` (with the name `exe`
/// calls it by, when that is a symlink beside it, as Debian's `pypy3` is),
/// and its stdlib, at the same place relative to `sys.prefix`, without the
/// test suite, site-packages or any pyc. Returns the copy's `exe`.
fn copy_install(exe: &Path, dest: &Path) -> PathBuf {
    let out = run_ok(Command::new(exe).args([
        "-I",
        "-c",
        "import sys, sysconfig; print(sys.prefix); print(sysconfig.get_paths()['stdlib'])",
    ]));
    let out = String::from_utf8(out.stdout).unwrap();
    let (prefix, stdlib) = out.trim().split_once('\n').unwrap();
    let real = std::fs::canonicalize(exe).unwrap();
    let bin = dest.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(&real);
    if exe != real && exe.parent() == real.parent() {
        cp.arg(exe);
    }
    run_ok(cp.arg(&bin));
    let lib = dest.join(Path::new(stdlib).strip_prefix(prefix).unwrap());
    std::fs::create_dir_all(&lib).unwrap();
    let skip = ["test", "site-packages", "dist-packages", "__pycache__"];
    let mut cp = Command::new("cp");
    cp.arg("-a");
    for entry in std::fs::read_dir(stdlib).unwrap() {
        let entry = entry.unwrap();
        if !skip.iter().any(|s| entry.file_name() == *s) {
            cp.arg(entry.path());
        }
    }
    run_ok(cp.arg(&lib));
    remove_pycache(dest);
    bin.join(exe.file_name().unwrap())
}

/// Each invalidation mode gives pycs whose header is right for the live
/// source, and a source that does not compile simply has no pyc.
#[test]
fn overlay_flavors_and_bad_sources() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("app");
    t.write("app/pkg/__init__.py", "from . import mod\n");
    t.write("app/pkg/mod.py", "VALUE = 42\n");
    t.write("app/pkg/broken.py", "def (:\n");
    let py = python("3.11");
    for (mode, flags) in [
        ("checked-hash", 3u32),
        ("unchecked-hash", 1),
        ("timestamp", 0),
    ] {
        let mnt = t.join(format!("mnt-{mode}"));
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mounted::start(
            &t,
            &t.store(),
            &mnt,
            &[
                OsStr::new("--source"),
                src.as_os_str(),
                mnt.as_os_str(),
                OsStr::new("--python"),
                py.as_os_str(),
                OsStr::new("--invalidation-mode"),
                OsStr::new(mode),
            ],
        );
        let pyc = mnt.join("pkg/__pycache__/mod.cpython-311.pyc");
        let meta = std::fs::metadata(&pyc).unwrap();
        let mut bytes = Vec::new();
        File::open(&pyc).unwrap().read_to_end(&mut bytes).unwrap();
        assert_eq!(
            bytes.len() as u64,
            meta.len(),
            "size at lookup != bytes read"
        );
        assert_eq!(
            u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
            flags,
            "{mode}"
        );
        if mode == "timestamp" {
            let source = std::fs::metadata(src.join("pkg/mod.py")).unwrap();
            assert_eq!(
                u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
                source.mtime() as u32
            );
            assert_eq!(
                u32::from_le_bytes(bytes[12..16].try_into().unwrap()),
                source.len() as u32
            );
        }
        assert!(!mnt.join("pkg/__pycache__/broken.cpython-311.pyc").exists());
        let code = format!(
            "import sys; sys.path.insert(0, {:?}); import pkg",
            mnt.to_str().unwrap()
        );
        let log = python_v(&py, &["-c", &code], &[]);
        assert_nothing_compiled(&log, &mnt, 2);
        m.unmount();
    }
}

/// PYTHONPYCACHEPREFIX pointed at the view: a read-only venv and the
/// stdlib import with nothing compiled from source; with --no-compile,
/// Python compiles once, what it writes is checked and stored, and the
/// second run compiles nothing.
#[test]
fn pycache_prefix_view() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let venv = t.join("venv");
    make_venv(&py, &venv);
    let before = tree_hash(&venv);
    let ro = ReadOnly::new(&venv);
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let code = format!("{PIP_IMPORTS}, json, email.parser, http.client");
    let env = [("PYTHONPYCACHEPREFIX", prefix.as_os_str())];
    let stdlib = py.parent().unwrap().parent().unwrap().join("lib");

    let mut m = Mounted::start(
        &t,
        &t.store(),
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    for _ in 0..2 {
        let log = python_v(&venv_python(&venv), &["-c", &code], &env);
        assert_served_by_prefix(&log, &prefix, &venv, 100);
        assert_served_by_prefix(&log, &prefix, &stdlib, 20);
    }
    m.unmount();

    let store = t.join("store-ingest");
    let mut m = Mounted::start(
        &t,
        &store,
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--no-compile"),
        ],
    );
    let first = python_v(&venv_python(&venv), &["-c", &code], &env);
    assert_output!(
        first.output,
        first.output.status.success(),
        "first run failed"
    );
    let from_source = first
        .from_source
        .iter()
        .filter(|p| p.starts_with(venv.to_str().unwrap()))
        .count();
    assert!(
        from_source > 100,
        "expected Python to compile: {from_source}"
    );
    let second = python_v(&venv_python(&venv), &["-c", &code], &env);
    assert_served_by_prefix(&second, &prefix, &venv, 100);
    let report = m.unmount();
    assert!(
        reported(&report, "written by Python stored") as usize >= from_source,
        "{report}"
    );
    assert_eq!(reported(&report, "compiled on first access"), 0, "{report}");

    // What was stored serves a compiling mount with nothing to compile.
    let mut m = Mounted::start(
        &t,
        &store,
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    let log = python_v(&venv_python(&venv), &["-c", &code], &env);
    assert_served_by_prefix(&log, &prefix, &venv, 100);
    let report = m.unmount();
    assert_eq!(reported(&report, "compiled on first access"), 0, "{report}");

    ro.release();
    assert_eq!(tree_hash(&venv), before, "the prefix changed");
}

/// The pycache-prefix view serves other interpreters too: the venv and the
/// stdlib import with nothing compiled from source, twice.
fn pycache_prefix_view_serves(version: &str) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python(version);
    let venv = t.join("venv");
    make_venv(&py, &venv);
    let ro = ReadOnly::new(&venv);
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    let code = format!("{PIP_IMPORTS}, json, email.parser");
    let env = [("PYTHONPYCACHEPREFIX", prefix.as_os_str())];
    for _ in 0..2 {
        let log = python_v(&venv_python(&venv), &["-c", &code], &env);
        assert_served_by_prefix(&log, &prefix, &venv, 100);
    }
    m.unmount();
    ro.release();
}

#[test]
fn pycache_prefix_cpython_3_13() {
    pycache_prefix_view_serves("3.13");
}

#[test]
fn pycache_prefix_pypy_3_9() {
    pycache_prefix_view_serves("pypy3.9");
}

/// Several processes importing at once from a cold store all succeed with
/// whole pycs; the mount keeps serving while `link` and `gc --max-size 0`
/// run on the same store, and compiles again what gc removed.
#[test]
fn concurrent_readers_link_and_gc() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let venv = t.join("venv");
    make_venv(&py, &venv);
    let other = t.join("other");
    make_venv(&py, &other);
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            venv.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--cache-ttl"),
            OsStr::new("2"),
        ],
    );
    let import = |n: usize| -> Vec<ImportLog> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| s.spawn(|| python_v(&venv_python(&mnt), &["-c", PIP_IMPORTS], &[])))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let logs = import(4);
    for log in &logs {
        assert_nothing_compiled(log, &mnt, 100);
    }
    let modules = logs[0]
        .from_pyc
        .iter()
        .filter(|p| p.starts_with(mnt.to_str().unwrap()))
        .count() as u64;

    // Served pycs have the size their lookup said, read whole by anyone.
    for pyc in pycs_under(&mnt).iter().take(50) {
        let path = mnt.join(pyc);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(std::fs::read(&path).unwrap().len() as u64, len, "{pyc:?}");
    }

    // link and gc on the same store while processes import.
    std::thread::scope(|s| {
        let link = s.spawn(|| run_ok(t.pycstore().args(["link", "-q"]).arg(&other)));
        let readers = s.spawn(|| import(2));
        link.join().unwrap();
        for log in readers.join().unwrap() {
            assert_nothing_compiled(&log, &mnt, 100);
        }
    });
    let gc = run_ok(t.pycstore().args(["gc", "--max-size", "0", "--json"]));
    let gc: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert!(gc["evicted"].as_u64().unwrap() > 100, "{gc}");
    // Past the kernel's cache of pyc entries (--cache-ttl 2), lookups find
    // the objects gone and compile them again.
    std::thread::sleep(Duration::from_secs(3));
    for log in import(2) {
        assert_nothing_compiled(&log, &mnt, 100);
    }
    let report = m.unmount();
    let compiled = reported(&report, "compiled on first access");
    assert!(
        compiled >= modules + modules / 2,
        "expected the evicted pycs compiled again ({modules} modules): {report}"
    );
    // Concurrent readers of one miss waited for one compile: each module was
    // compiled about twice (cold, then after gc), not once per reader.
    assert!(
        compiled <= 2 * modules + modules / 4,
        "misses compiled more than once ({modules} modules): {report}"
    );
}

/// --daemon returns once the mount is up; SIGTERM unmounts; a killed server
/// leaves a mount point that fails at once, and `pycstore unmount` clears it.
#[test]
fn daemon_sigterm_and_dead_server() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    t.write("app/mod.py", "VALUE = 1\n");
    let src = t.join("app");
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let py = python("3.11");
    let args = |cmd: &mut Command| {
        cmd.arg("mount")
            .arg("--daemon")
            .arg("--source")
            .arg(&src)
            .arg(&mnt)
            .arg("--python")
            .arg(&py)
            .stderr(Stdio::null());
    };

    let log = t.join("mount.log");
    let mut cmd = t.pycstore();
    args(&mut cmd);
    let out = run_ok(cmd.arg("--log").arg(&log));
    assert!(
        is_mounted(&mnt),
        "--daemon returned before the mount was up"
    );
    assert!(mnt.join("__pycache__/mod.cpython-311.pyc").is_file());
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while is_mounted(&mnt) || Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "SIGTERM did not end the server");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The detached server's messages went to its log, its final report last.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("pycstore: serving the overlay"), "{log}");
    assert_eq!(reported(&log, "compiled on first access"), 1, "{log}");
    assert!(!log.contains('\x1b'), "colors in the log file: {log:?}");

    let mut cmd = t.pycstore();
    args(&mut cmd);
    let out = run_ok(&mut cmd);
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let err = std::fs::read_dir(&mnt).map(|_| ()).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    run_ok(t.pycstore().arg("unmount").arg(&mnt));
    assert!(!is_mounted(&mnt));
    let out = run(t.pycstore().arg("unmount").arg(&mnt));
    assert_output!(
        out,
        !out.status.success(),
        "unmounting a non-mount must fail"
    );
}

/// Only the mount's owner sees it, unless --allow-other: then another user
/// reads the same pycs (the tree's permissions still apply).
#[test]
fn other_users_only_with_allow_other() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let t = TestDir::new();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t.write("app/mod.py", "VALUE = 1\n");
    let src = t.join("app");
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let pyc = mnt.join("__pycache__/mod.cpython-311.pyc");
    // `python3.11 -c SCRIPT PYC` as nobody: prints the pyc's length.
    let as_nobody = || {
        run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(python("3.11"))
            .args([
                "-I",
                "-c",
                "import sys; print(len(open(sys.argv[1], 'rb').read()))",
            ])
            .arg(&pyc))
    };
    for allow_other in [false, true] {
        let mut args = vec![
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
        ];
        let py = python("3.11");
        args.push(py.as_os_str());
        if allow_other {
            args.push(OsStr::new("--allow-other"));
        }
        let mut m = Mounted::start(&t, &t.store(), &mnt, &args);
        let len = std::fs::read(&pyc).unwrap().len();
        let out = as_nobody();
        if allow_other {
            assert_output!(
                out,
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout).trim() == len.to_string(),
                "another user cannot read a pyc of an --allow-other mount"
            );
        } else {
            assert_output!(
                out,
                !out.status.success()
                    && String::from_utf8_lossy(&out.stderr).contains("PermissionError"),
                "another user can read a private mount"
            );
        }
        m.unmount();
    }
}

/// The unprivileged user the permission tests read as.
const NOBODY: u32 = 65534;

/// `PROGRAM` as the user `nobody`, without root's groups or capabilities.
fn as_nobody(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .args(["--clear-groups", "--"])
        .arg(program);
    cmd
}

/// What `nobody` gets opening each path: the length read (a file), the
/// number of entries (a directory), or the error's name (`EACCES`).
fn nobody_reads(paths: &[&Path]) -> Vec<String> {
    let script = "import os, sys, errno\n\
        for p in sys.argv[1:]:\n\
        \x20   try:\n\
        \x20       print(len(os.listdir(p)) if os.path.isdir(p) else len(open(p, 'rb').read()))\n\
        \x20   except OSError as e:\n\
        \x20       print(errno.errorcode[e.errno])\n";
    let out = run_ok(
        as_nobody(&system_python())
            .args(["-I", "-c", script])
            .args(paths),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `python -v ARGS` as `nobody`, with bytecode writing allowed.
fn python_v_as_nobody(python: &Path, args: &[&str], envs: &[(&str, &OsStr)]) -> ImportLog {
    let mut cmd = as_nobody(python);
    cmd.current_dir("/");
    python_v_with(cmd, args, envs)
}

/// A tree of sources owned by root, in a directory others may search:
/// `app/public.py` (0644), `app/secret.py` (0600), `app/private/` (0700)
/// holding `mod.py` (0644), and `app/linked.py`, a symlink to a 0644
/// `creds.py` in a 0700 directory outside the tree (what a user who may
/// write into the tree could point at).
fn permission_tree(t: &TestDir) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    mode(t.path(), 0o755);
    mode(&t.write("app/public.py", "VALUE = 1\n"), 0o644);
    mode(&t.write("app/secret.py", "TOKEN = 'hunter2'\n"), 0o600);
    mode(&t.write("app/private/mod.py", "VALUE = 2\n"), 0o644);
    mode(&t.join("app/private"), 0o700);
    mode(
        &t.write("vault/creds.py", "PASSWORD = 'swordfish'\n"),
        0o644,
    );
    mode(&t.join("vault"), 0o700);
    std::os::unix::fs::symlink(t.join("vault/creds.py"), t.join("app/linked.py")).unwrap();
    mode(&t.join("app"), 0o755);
    t.join("app")
}

/// With --allow-other, the overlay's pycs are as readable as their
/// sources and no more: another user reads the pyc of a world-readable
/// source (and imports from it), but gets EACCES for a 0600 source's pyc,
/// for a symlinked source whose target lies in a directory it cannot
/// search, and for the `__pycache__` of a 0700 directory.
#[test]
fn overlay_pycs_as_readable_as_their_sources() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = permission_tree(&t);
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let py = system_python();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--allow-other"),
        ],
    );
    let pyc = |rel: &str| mnt.join(rel);
    let public = pyc("__pycache__/public.cpython-311.pyc");
    let secret = pyc("__pycache__/secret.cpython-311.pyc");
    let linked = pyc("__pycache__/linked.cpython-311.pyc");
    let private = pyc("private/__pycache__");
    let private_pyc = pyc("private/__pycache__/mod.cpython-311.pyc");
    // The owner (root) reads them all.
    for p in [&public, &secret, &linked, &private_pyc] {
        assert!(std::fs::read(p).unwrap().len() > 16, "{}", p.display());
    }
    let got = nobody_reads(&[&public, &secret, &linked, &private, &private_pyc]);
    assert_eq!(got[0], std::fs::read(&public).unwrap().len().to_string());
    assert_eq!(got[1..], ["EACCES"; 4], "nobody: {got:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&public), 0o444);
    assert_eq!(mode(&secret), 0o400);
    assert_eq!(std::fs::metadata(&secret).unwrap().uid(), 0);
    assert_eq!(mode(&linked), 0o400);
    assert_eq!(mode(&private), 0o500);

    let code = format!(
        "import sys; sys.path.insert(0, {:?}); import public",
        mnt.to_str().unwrap()
    );
    let log = python_v_as_nobody(&py, &["-c", &code], &[]);
    assert_output!(
        log.output,
        log.output.status.success() && log.from_pyc.contains(&public.display().to_string()),
        "nobody did not import public from its pyc: {:?}",
        log.from_pyc
    );
    let code = format!(
        "import sys; sys.path.insert(0, {:?}); import secret",
        mnt.to_str().unwrap()
    );
    let log = python_v_as_nobody(&py, &["-c", &code], &[]);
    assert_output!(
        log.output,
        !log.output.status.success() && !log.from_pyc.contains(&secret.display().to_string()),
        "nobody imported a source it cannot read"
    );
    m.unmount();
}

/// A pyc keeps the read bits its source's way gave it when it was made: a
/// symlink to a source others may not reach, replaced by a file they may
/// read, does not open the pyc made from the first (its bytes are that
/// source's) to them, even where the kernel asks for its attributes again
/// before forgetting it.
#[test]
fn a_replaced_symlink_opens_no_pyc_made_through_it() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = permission_tree(&t);
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let py = system_python();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--allow-other"),
        ],
    );
    let linked = mnt.join("__pycache__/linked.cpython-311.pyc");
    let made = std::fs::read(&linked).unwrap().len();
    assert!(made > 16);
    assert_eq!(nobody_reads(&[&linked]), ["EACCES"]);
    // The symlink gives way to a file everyone may read; the kernel still
    // holds the pyc it looked up, and asks for its attributes again.
    std::fs::remove_file(src.join("linked.py")).unwrap();
    std::fs::write(src.join("linked.py"), "").unwrap();
    run_ok(Command::new("stat").arg("--cached=never").arg(&linked));
    // The pyc of the empty file that replaced it has another length.
    let got = nobody_reads(&[&linked]);
    assert!(
        got != [made.to_string()],
        "nobody read the pyc made from the symlink's target ({made} bytes): {got:?}"
    );
    m.unmount();
}

/// With --allow-other, the pycache-prefix view mirrors the tree's
/// directories, owner and mode included, and gives each pyc its source's
/// read bits: another user imports a world-readable module from its pyc,
/// but gets EACCES for a 0600 source's pyc, for a symlinked source in a
/// directory it cannot search, and for a 0700 directory and what is in
/// it. Nor can it make the view store a pyc, for a source it can read or
/// one it cannot.
#[test]
fn pycache_prefix_mirrors_permissions() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = permission_tree(&t);
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let py = system_python();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--allow-other"),
        ],
    );
    let mirrored = prefix.join(src.strip_prefix("/").unwrap());
    let public = mirrored.join("public.cpython-311.pyc");
    let secret = mirrored.join("secret.cpython-311.pyc");
    let linked = mirrored.join("linked.cpython-311.pyc");
    let private = mirrored.join("private");
    let private_pyc = private.join("mod.cpython-311.pyc");
    for p in [&public, &secret, &linked, &private_pyc] {
        assert!(std::fs::read(p).unwrap().len() > 16, "{}", p.display());
    }
    let got = nobody_reads(&[&public, &secret, &linked, &private, &private_pyc]);
    assert_eq!(got[0], std::fs::read(&public).unwrap().len().to_string());
    assert_eq!(got[1..], ["EACCES"; 4], "nobody: {got:?}");
    let meta = |p: &Path| std::fs::metadata(p).unwrap();
    assert_eq!(meta(&private).mode() & 0o7777, 0o700);
    assert_eq!(meta(&private).uid(), 0);
    assert_eq!(meta(&mirrored).mode() & 0o7777, 0o755);
    assert_eq!(meta(&public).mode() & 0o7777, 0o444);
    assert_eq!(meta(&secret).mode() & 0o7777, 0o400);
    assert_eq!(meta(&linked).mode() & 0o7777, 0o400);

    let env = [("PYTHONPYCACHEPREFIX", prefix.as_os_str())];
    let code = format!(
        "import sys; sys.path.insert(0, {:?}); import public",
        src.to_str().unwrap()
    );
    let log = python_v_as_nobody(&py, &["-c", &code], &env);
    assert_output!(
        log.output,
        log.output.status.success() && log.from_pyc.contains(&public.display().to_string()),
        "nobody did not import public from its pyc: {:?}",
        log.from_pyc
    );

    // Writes by another user are refused, even where the tree lets
    // everyone create (a 1777 directory, mirrored as such).
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(src.join("shared")).unwrap();
    std::fs::set_permissions(src.join("shared"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    t.write("app/shared/mine.py", "VALUE = 3\n");
    let pyc = std::fs::read(&public).unwrap();
    let script = "import sys\n\
        for p in sys.argv[2:]:\n\
        \x20   try:\n\
        \x20       open(p, 'wb').write(open(sys.argv[1], 'rb').read())\n\
        \x20       print('written')\n\
        \x20   except OSError as e:\n\
        \x20       print(e.strerror)\n";
    let tmp = t.join("public.pyc");
    std::fs::write(&tmp, &pyc).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_ok(
        as_nobody(&py)
            .args(["-I", "-c", script])
            .arg(&tmp)
            .arg(mirrored.join("shared/mine.cpython-311.pyc"))
            .arg(mirrored.join("shared/mine.cpython-311.pyc.1234")),
    );
    assert_output!(
        out,
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>()
            == ["Permission denied"; 2],
        "nobody wrote into the view"
    );
    assert_eq!(
        meta(&mirrored.join("shared")).mode() & 0o7777,
        0o1777,
        "the shared directory is not mirrored"
    );
    let report = m.unmount();
    assert_eq!(reported(&report, "written by Python stored"), 0, "{report}");
}

/// A pyc written into the pycache-prefix view with the right header and a
/// body that is a code type byte then garbage is not stored: `link` later
/// compiles the source instead of placing it.
#[test]
fn pycache_prefix_refuses_an_unloadable_body() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let app = t.join("app");
    let source = t.write("app/mod.py", "X = 41 + 1\n");
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let store = t.join("store-ingest");
    let mut m = Mounted::start(
        &t,
        &store,
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--no-compile"),
            OsStr::new("--invalidation-mode"),
            OsStr::new("checked-hash"),
        ],
    );
    let mut target = prefix.as_os_str().to_owned();
    target.push(app.as_os_str());
    let target = PathBuf::from(target).join("mod.cpython-311.pyc");
    // A real checked-hash header for the source, then 'c' and garbage.
    let forge = "import importlib.util, sys\n\
                 src = open(sys.argv[1], 'rb').read()\n\
                 header = importlib.util.MAGIC_NUMBER + (3).to_bytes(4, 'little') \
                 + importlib.util.source_hash(src)\n\
                 try:\n\
                 \x20   with open(sys.argv[2], 'wb') as f:\n\
                 \x20       f.write(header + b'c' + bytes(range(200)))\n\
                 except OSError as e:\n\
                 \x20   print('refused:', e)\n";
    let out = run_ok(
        Command::new(&py)
            .args(["-c", forge])
            .arg(&source)
            .arg(&target),
    );
    let report = m.unmount();
    assert!(
        report.contains("loadable"),
        "the view did not say why it refused: {report}\n{out:?}"
    );
    let (out, json) = link_json(
        pycstore(&store)
            .args(["link", "--python"])
            .arg(&py)
            .arg(&app),
    );
    assert_output!(out, out.status.success(), "link failed");
    assert_eq!(json["compiled"], 1, "the forged pyc was stored: {json}");
    assert_eq!(json["hits"], 0, "{json}");
    let log = python_v(
        &py,
        &["-c", "import mod; assert mod.X == 42"],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, &app, 1);
}

/// The view stores what Python writes under the digest of the source's
/// bytes, for every tree holding them, but Python compiled what it read
/// before. So a pyc is stored only for a source nobody but root and the
/// mount's owner can change, written by a process that sees the same
/// files, and a timestamp pyc (which names its source by mtime and size
/// only) only if the source last changed before Python began writing. A
/// user who swaps their file for another of the same size, its mtime put
/// back, while root's Python compiles it (here the forged result is
/// written directly: the bytecode of `X = 'a'` under the header of their
/// `X = 'u'`) gets nothing served to another tree; nor does a real
/// checked-hash pyc of their file (a 64-bit SipHash collision would
/// serve one), nor a pyc of root's own settled file written from another
/// mount namespace, nor one of a source written just before Python wrote
/// its pyc. Root's settled source, imported as usual, is stored.
#[test]
fn pycache_prefix_stores_pycs_only_of_sources_no_one_else_changes() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let theirs = t.join("theirs");
    let their_source = t.write("theirs/mod.py", "X = 'u'\n");
    let their_hashed = t.write("theirs/hashed.py", "H = 'h'\n");
    for p in [&theirs, &their_source, &their_hashed] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    let mine = t.join("mine");
    t.write("mine/old.py", "Y = 'old'\n");
    t.write("mine/ns.py", "N = 'ns'\n");
    std::thread::sleep(Duration::from_millis(1200));
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let store = t.join("store-ingest");
    let mut m = Mounted::start(
        &t,
        &store,
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--no-compile"),
        ],
    );
    t.write("mine/fresh.py", "Z = 'fresh'\n");
    let env = [
        ("PYTHONPYCACHEPREFIX", prefix.as_os_str()),
        ("PYTHONPATH", mine.as_os_str()),
    ];
    let log = python_v(&py, &["-S", "-c", "import old, fresh"], &env);
    assert_output!(log.output, log.output.status.success(), "import failed");
    let compiled = |dir: &Path| {
        log.from_source
            .iter()
            .filter(|p| p.starts_with(dir.to_str().unwrap()))
            .count()
    };
    assert_eq!(compiled(&mine), 2, "{:?}", log.from_source);
    let mut view_dir = prefix.as_os_str().to_owned();
    view_dir.push(theirs.as_os_str());
    let forged = PathBuf::from(view_dir).join("mod.cpython-311.pyc");
    let forge = "import importlib.util, marshal, os, sys\n\
                 st = os.stat(sys.argv[1])\n\
                 header = importlib.util.MAGIC_NUMBER + bytes(4) \
                 + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, 'little') \
                 + (st.st_size & 0xFFFFFFFF).to_bytes(4, 'little')\n\
                 body = marshal.dumps(compile(b\"X = 'a'\\n\", sys.argv[1], 'exec'))\n\
                 try:\n\
                 \x20   with open(sys.argv[2], 'wb') as f:\n\
                 \x20       f.write(header + body)\n\
                 except OSError as e:\n\
                 \x20   print('refused:', e)\n";
    let out = run_ok(
        Command::new(&py)
            .args(["-c", forge])
            .arg(&their_source)
            .arg(&forged),
    );
    let hashed = "import py_compile, sys\n\
                  py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True, \
                  invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)\n";
    let written = run(Command::new(&py)
        .args(["-c", hashed])
        .arg(&their_hashed)
        .arg(forged.with_file_name("hashed.cpython-311.pyc")));
    assert!(
        !written.status.success(),
        "the view took the pyc: {written:?}"
    );
    let other_ns = run(Command::new("unshare")
        .args(["--mount", "--"])
        .arg(&py)
        .args(["-S", "-c", "import ns"])
        .env_remove("PYTHONDONTWRITEBYTECODE")
        .envs(env));
    assert_output!(
        other_ns,
        other_ns.status.success(),
        "import in another namespace"
    );
    let report = m.unmount();
    // Root's settled source, and the standard library Python compiled on
    // the way, are stored; the other four are refused.
    assert!(
        reported(&report, "written by Python stored") >= 1,
        "{report}\n{out:?}"
    );
    assert_eq!(reported(&report, "refused"), 4, "{report}\n{out:?}");
    for why in [
        "belongs to user id 65534",
        "less than a second",
        "another mount namespace",
    ] {
        assert!(
            report.contains(why),
            "the view did not say `{why}`: {report}"
        );
    }

    // Another tree holding the same three sources: only root's settled one
    // is served from what Python wrote; the others compile, and import as
    // their own bytes say.
    let other = t.join("other");
    t.write("other/mod.py", "X = 'u'\n");
    t.write("other/old.py", "Y = 'old'\n");
    t.write("other/fresh.py", "Z = 'fresh'\n");
    t.write("other/hashed.py", "H = 'h'\n");
    t.write("other/ns.py", "N = 'ns'\n");
    let (out, json) = link_json(
        pycstore(&store)
            .args(["link", "--python"])
            .arg(&py)
            .arg(&other),
    );
    assert_output!(out, out.status.success(), "link failed");
    assert_eq!(json["hits"], 1, "{json}");
    assert_eq!(json["compiled"], 4, "{json}");
    let log = python_v(
        &py,
        &[
            "-c",
            "import mod, old, fresh, hashed, ns; \
             assert (mod.X, old.Y, fresh.Z) == ('u', 'old', 'fresh')",
        ],
        &[("PYTHONPATH", other.as_os_str())],
    );
    assert_nothing_compiled(&log, &other, 5);
}

/// The object check `link` makes reaches the overlay: a `chown` through a
/// hardlinked pyc hands its store object to `nobody`, and its bytes are
/// then changed (a body of the same length, under the same header, that
/// sets another value). The overlay does not serve those bytes: it compiles
/// the module again, Python imports it from the served pyc with the right
/// value, and the store's object gets a fresh inode the changed one no
/// longer shares.
#[test]
fn overlay_never_serves_an_object_changed_through_a_hardlink() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let venv = t.join("venv");
    run_ok(
        Command::new(&py)
            .args(["-m", "venv", "--without-pip"])
            .arg(&venv),
    );
    let site = Path::new("lib/python3.11/site-packages");
    std::fs::write(venv.join(site).join("good.py"), "VALUE = 'good'\n").unwrap();
    std::fs::write(venv.join(site).join("other.py"), "VALUE = 'other'\n").unwrap();
    // A copy without pycs, for the overlay; moved to the venv's own path
    // below, so the view compiles exactly what `link` did.
    let pristine = t.join("pristine");
    run_ok(Command::new("cp").arg("-a").arg(&venv).arg(&pristine));
    let (out, json) = link_json(
        pycstore(&t.store())
            .args(["link", "--link-mode", "hardlink"])
            .arg(&venv),
    );
    assert_output!(out, out.status.success(), "link failed");
    assert_eq!(json["compiled"], 2, "{json}");

    let pyc = venv.join(site).join("__pycache__/good.cpython-311.pyc");
    let good = std::fs::read(&pyc).unwrap();
    let hex = pycstore_store::objects::ObjectId::of(&good).to_hex();
    let object = t.store().join("objects-v1").join(&hex[..2]).join(&hex[2..]);
    let linked = std::fs::metadata(&pyc).unwrap();
    assert_eq!(linked.ino(), std::fs::metadata(&object).unwrap().ino());

    // The attack, through the hardlinked pyc: the object changes owner,
    // then bytes (same length, same header, another value).
    std::os::unix::fs::chown(&pyc, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&pyc, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut evil = good.clone();
    let at = evil[16..]
        .windows(4)
        .position(|w| w == b"good")
        .expect("the constant in the body")
        + 16;
    evil[at..at + 4].copy_from_slice(b"evil");
    std::fs::write(&pyc, &evil).unwrap();
    let changed = std::fs::metadata(&object).unwrap();
    assert_eq!(changed.ino(), linked.ino());
    assert_eq!(std::fs::read(&object).unwrap(), evil);

    let attacked = t.join("attacked");
    std::fs::rename(&venv, &attacked).unwrap();
    std::fs::rename(&pristine, &venv).unwrap();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &venv,
        &[OsStr::new("--over"), venv.as_os_str()],
    );
    assert_eq!(
        std::fs::read(&pyc).unwrap(),
        good,
        "served the changed bytes"
    );
    let log = python_v(
        &venv_python(&venv),
        &[
            "-c",
            "import good, other; assert (good.VALUE, other.VALUE) == ('good', 'other'), good.VALUE",
        ],
        &[],
    );
    assert_nothing_compiled(&log, &venv, 2);
    let report = m.unmount();
    assert_eq!(reported(&report, "compiled on first access"), 1, "{report}");
    assert!(
        reported(&report, "pycs served from the store") >= 1,
        "{report}"
    );
    assert!(report.contains("not what the store gave it"), "{report}");

    // The store's object is a fresh inode with the compiled bytes, the
    // store's owner and an object mode; the attacked venv keeps the old one.
    let fresh = std::fs::metadata(&object).unwrap();
    assert_ne!(fresh.ino(), changed.ino());
    assert_eq!(
        (fresh.uid(), fresh.mode() & 0o7777, fresh.nlink()),
        (0, 0o444, 1)
    );
    assert_eq!(std::fs::read(&object).unwrap(), good);
    let old = attacked.join(site).join("__pycache__/good.cpython-311.pyc");
    assert_eq!(std::fs::metadata(&old).unwrap().ino(), changed.ino());
}

/// A FIFO named like a source: asking the overlay for its pyc answers at
/// once (no pyc) instead of blocking a request thread on the FIFO.
#[test]
fn overlay_does_not_block_on_a_fifo_source() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let src = t.join("src");
    t.write("src/ok.py", "OK = 1\n");
    run_ok(Command::new("mkfifo").arg(src.join("fifo.py")));
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    let out = run(Command::new("timeout")
        .arg("20")
        .arg("cat")
        .arg(mnt.join("__pycache__/fifo.cpython-311.pyc")));
    assert_ne!(out.status.code(), Some(124), "reading the FIFO's pyc hung");
    assert!(!out.status.success(), "a FIFO got a pyc: {out:?}");
    assert!(mnt.join("__pycache__/ok.cpython-311.pyc").is_file());
    m.unmount();
}

/// A file of the tree swapped for a FIFO after the kernel looked it up:
/// reading it through the overlay fails at once instead of holding a
/// request thread until a writer comes.
#[test]
fn a_file_swapped_for_a_fifo_does_not_block_the_overlay() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let src = t.join("src");
    t.write("src/data.txt", "data\n");
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    assert!(mnt.join("data.txt").is_file());
    std::fs::remove_file(src.join("data.txt")).unwrap();
    run_ok(Command::new("mkfifo").arg(src.join("data.txt")));
    let out = run(Command::new("timeout")
        .arg("20")
        .arg("cat")
        .arg(mnt.join("data.txt")));
    assert_ne!(out.status.code(), Some(124), "reading the FIFO hung");
    assert!(!out.status.success(), "a FIFO was read: {out:?}");
    m.unmount();
}

/// A directory of the tree swapped for a symlink after the kernel looked
/// it up (it keeps the entry for `--cache-ttl`) leads nowhere: the overlay
/// never serves, as the mount's owner, a file from outside the tree that
/// the symlink points to.
#[test]
fn a_directory_swapped_for_a_symlink_serves_nothing_from_outside() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let py = python("3.11");
    let src = t.join("src");
    t.write("src/w/d/data.txt", "inside\n");
    t.write(
        "outside/data.txt",
        "outside: a secret of the mount's owner\n",
    );
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    // Looked up (not read) through the view, then swapped in the tree.
    assert!(mnt.join("w/d/data.txt").is_file());
    std::fs::rename(src.join("w/d"), src.join("w/x")).unwrap();
    std::os::unix::fs::symlink(t.join("outside"), src.join("w/d")).unwrap();
    let read = std::fs::read_to_string(mnt.join("w/d/data.txt"));
    assert!(
        !read.as_deref().unwrap_or("").contains("outside"),
        "the view served a file from outside the tree: {read:?}"
    );
    m.unmount();
}

/// A POSIX access ACL of `entries` (tag, permission bits, id), as the
/// `system.posix_acl_access` xattr holds it.
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// The views answer with mode bits, which the kernel checks for every
/// reader; an ACL entry that denies a user what the mode bits give others
/// (`user:nobody:---` on a 0644 source and on a 0755 directory, in the
/// tree and outside it on the way to a symlinked source) is applied by the
/// view too: nobody reads neither the source, nor its pyc, nor the
/// directory, nor the symlinked source's pyc through the overlay, as on
/// the tree itself, while a source without an ACL beside them stays
/// readable. Before, the view showed the mode bits alone and nobody read
/// all four.
#[test]
fn overlay_applies_what_an_acl_denies() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("app");
    let denied = t.write("app/denied.py", "SECRET = 1\n");
    t.write("app/plain.py", "PLAIN = 1\n");
    t.write("app/closed/data.py", "DATA = 1\n");
    // A source reached by a symlink, in a directory outside the tree whose
    // ACL denies nobody the search the mode bits allow.
    let outside = t.write("home/victim/mod.py", "KEY = 1\n");
    std::os::unix::fs::symlink(&outside, src.join("linked.py")).unwrap();
    let (user_obj, user, group_obj, mask, other) = (0x01, 0x02, 0x04, 0x10, 0x20);
    let none = u32::MAX;
    let file_acl = acl_xattr(&[
        (user_obj, 6, none),
        (user, 0, NOBODY),
        (group_obj, 4, none),
        (mask, 4, none),
        (other, 4, none),
    ]);
    let dir_acl = acl_xattr(&[
        (user_obj, 7, none),
        (user, 0, NOBODY),
        (group_obj, 5, none),
        (mask, 5, none),
        (other, 5, none),
    ]);
    rustix::fs::setxattr(
        &denied,
        "system.posix_acl_access",
        &file_acl,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    for dir in [src.join("closed"), t.join("home/victim")] {
        rustix::fs::setxattr(
            &dir,
            "system.posix_acl_access",
            &dir_acl,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    assert_eq!(
        std::fs::metadata(&denied).unwrap().mode() & 0o777,
        0o644,
        "the ACL changed the mode bits"
    );
    let on_tree = nobody_reads(&[&denied, &src.join("closed"), &src.join("linked.py")]);
    assert_eq!(on_tree, ["EACCES"; 3], "the tree's filesystem ignores ACLs");

    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let py = python("3.11");
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--allow-other"),
        ],
    );
    let got = nobody_reads(&[
        &mnt.join("denied.py"),
        &mnt.join("__pycache__/denied.cpython-311.pyc"),
        &mnt.join("closed"),
        &mnt.join("__pycache__/linked.cpython-311.pyc"),
        &mnt.join("plain.py"),
        &mnt.join("__pycache__/plain.cpython-311.pyc"),
    ]);
    assert_eq!(got[..4], ["EACCES"; 4], "nobody through the view: {got:?}");
    assert_ne!(got[4], "EACCES", "{got:?}");
    assert_ne!(got[5], "EACCES", "{got:?}");
    // The owner still reads all of it.
    assert!(
        std::fs::read(mnt.join("__pycache__/denied.cpython-311.pyc"))
            .unwrap()
            .len()
            > 16
    );
    assert_eq!(std::fs::read_dir(mnt.join("closed")).unwrap().count(), 2);
    m.unmount();
}

/// The view keeps a node for every name the kernel knows, and drops it
/// once the kernel forgets the name: names a tree's writer keeps making up
/// (five rounds of 12,000 new files, each listed and looked up through the
/// overlay, then removed, the kernel's caches dropped) do not grow the
/// server round after round: measured, 6 MB over the last three rounds;
/// before, when every node stayed for good, 44 MB. (One malloc arena, so
/// that memory freed in one round is what the next one reuses, whichever
/// thread allocates it: jemalloc's `narenas:1`, the process's allocator;
/// with its default, four arenas a CPU, it grew by 22 MB once.)
#[test]
fn overlay_memory_stays_bounded_as_names_come_and_go() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("tree");
    t.write("tree/app/mod.py", "VALUE = 1\n");
    let dir = src.join("names");
    std::fs::create_dir(&dir).unwrap();
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let py = python("3.11");
    let mut cmd = pycstore(&t.store());
    cmd.arg("mount")
        .arg("--source")
        .arg(&src)
        .arg(&mnt)
        .arg("--python")
        .arg(&py)
        .env("MALLOC_CONF", "narenas:1");
    let m = Mounted::spawn(&t, cmd, &t.store(), &mnt);
    let pid = m.child.as_ref().unwrap().id();
    let rss_kb = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let pad = "x".repeat(200);
    let mut rss = Vec::new();
    for round in 0..5 {
        let names: Vec<String> = (0..12_000).map(|i| format!("r{round}-{i}-{pad}")).collect();
        for name in &names {
            File::create(dir.join(name)).unwrap();
        }
        assert_eq!(
            std::fs::read_dir(mnt.join("names")).unwrap().count(),
            names.len()
        );
        for name in &names {
            std::fs::metadata(mnt.join("names").join(name)).unwrap();
        }
        for name in &names {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
        // The kernel forgets what it no longer caches.
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        rss.push(rss_kb());
    }
    let growth = rss[4].saturating_sub(rss[1]);
    assert!(
        growth < 20 * 1024,
        "the server grew by {growth} KiB over three rounds (RSS after each: {rss:?} KiB)"
    );
    let read = std::fs::read(mnt.join("app/__pycache__/mod.cpython-311.pyc")).unwrap();
    assert!(read.len() > 16);
    drop(m);
}

/// A reader looking up many missing pycs at once (each lookup its own, as
/// many processes would) had the server start a thread, as root, for each
/// lookup waiting for a compile. Now at most 64 wait: a lookup past them
/// is told at once that there is no pyc (Python then compiles the source
/// itself), and every pyc is served once compiled.
#[test]
fn overlay_bounds_the_lookups_waiting_for_misses() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("tree");
    // One source, a second or two to compile, under 200 names: every
    // lookup waits for the same compile.
    let slow: String = (0..100_000).map(|i| format!("v{i} = {i}\n")).collect();
    const NAMES: usize = 200;
    let first = t.write("tree/app/m0.py", slow);
    for i in 1..NAMES {
        std::fs::hard_link(&first, src.join(format!("app/m{i}.py"))).unwrap();
    }
    t.write("tree/app/quick.py", "VALUE = 1\n");
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let py = python("3.11");
    let m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--jobs"),
            OsStr::new("1"),
        ],
    );
    let pid = m.child.as_ref().unwrap().id();
    let threads = || -> usize {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // The compile worker is started, and the server at rest.
    std::fs::metadata(mnt.join("app/__pycache__/quick.cpython-311.pyc")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let at_rest = threads();
    let pyc = |i: usize| mnt.join(format!("app/__pycache__/m{i}.cpython-311.pyc"));
    let start = std::sync::Arc::new(std::sync::Barrier::new(NAMES + 1));
    let lookups: Vec<_> = (0..NAMES)
        .map(|i| {
            let (path, start) = (pyc(i), std::sync::Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                std::fs::metadata(path).map(|_| ()).map_err(|e| e.kind())
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut most = 0;
    while lookups.iter().any(|l| !l.is_finished()) && began.elapsed() < Duration::from_secs(120) {
        most = most.max(threads());
        std::thread::sleep(Duration::from_millis(2));
    }
    let answers: Vec<_> = lookups.into_iter().map(|l| l.join().unwrap()).collect();
    let served = answers.iter().filter(|a| a.is_ok()).count();
    let turned_away = answers
        .iter()
        .filter(|a| **a == Err(std::io::ErrorKind::NotFound))
        .count();
    assert_eq!(served + turned_away, NAMES, "{answers:?}");
    assert!(
        served >= 1 && turned_away >= 1,
        "{served} lookups waited for the compile, {turned_away} were turned away \
         (in {:?}; the server ran {most} threads, {at_rest} at rest)",
        began.elapsed()
    );
    // 64 waiting, and a few the compile and the store start meanwhile.
    assert!(
        most <= at_rest + 64 + 8,
        "the server ran {most} threads during the lookups, {at_rest} at rest"
    );
    // Compiled once, served under every name.
    for i in 0..NAMES {
        let meta = std::fs::metadata(pyc(i)).unwrap_or_else(|e| panic!("m{i}: {e}"));
        assert!(meta.len() > 16);
    }
    drop(m);
}

/// The pycache-prefix view mirrors `/`, its own mount point included when
/// reached by another path (a symlink to a directory above it, as
/// `/var/run` is to `/run`). Looking up a name there must not make the
/// server look into its own mount: each pass through it would hold one
/// request thread waiting for another, and with the kernel's cache off
/// (`--cache-ttl 0`, or the default's minute gone) a path passing through
/// the mount eight times took all four threads and hung the view for
/// every reader. Now the lookup fails at once and the view goes on serving.
#[test]
fn pycache_prefix_never_looks_into_its_own_mount() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    t.write("app/mod.py", "VALUE = 1\n");
    std::os::unix::fs::symlink(t.path(), t.join("alias")).unwrap();
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let py = python("3.11");
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--threads"),
            OsStr::new("4"),
            OsStr::new("--cache-ttl"),
            OsStr::new("0"),
        ],
    );
    let mirror = |dir: &Path| prefix.join(dir.strip_prefix("/").unwrap());
    let mut deep = prefix.clone();
    for _ in 0..8 {
        deep = deep
            .join(t.path().strip_prefix("/").unwrap())
            .join("alias/pycache");
    }
    let deep = deep.join(t.path().strip_prefix("/").unwrap()).join("app");
    let mut stat = Command::new("stat")
        .arg(&deep)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stat.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // Killing the server would not end requests its own threads
            // wait on: abort the connection, which fails them all.
            abort_fuse_connection(&prefix);
            let _ = stat.wait();
            panic!(
                "the view hung on a path through its own mount:\n{}",
                m.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = stat.wait_with_output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    let pyc = mirror(&t.join("app")).join("mod.cpython-311.pyc");
    let read = std::fs::read(&pyc);
    assert!(
        read.as_ref().is_ok_and(|b| b.len() > 16),
        "{}: {read:?}",
        pyc.display()
    );
    m.unmount();
}

/// A tree's owner can make its sources symlinks through the overlay's own
/// mount point (`x0.py -> MOUNT/x1.py -> ... -> MOUNT/real.py`). Following
/// one for a pyc, a request thread waited on requests of the same server;
/// eight readers at once (with the kernel's cache off) held all four
/// threads and hung the overlay for every reader. Now such a source has no
/// pyc (Python compiles it), and the view goes on serving.
#[test]
fn overlay_sources_symlinked_through_the_mount_do_not_hang_it() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("app");
    t.write("app/real.py", "V = 1\n");
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for i in 0..12 {
        std::os::unix::fs::symlink(
            mnt.join(format!("x{}.py", i + 1)),
            src.join(format!("x{i}.py")),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink(mnt.join("real.py"), src.join("x12.py")).unwrap();
    let py = python("3.11");
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--threads"),
            OsStr::new("4"),
            OsStr::new("--cache-ttl"),
            OsStr::new("0"),
        ],
    );
    let (done, finished) = std::sync::mpsc::channel();
    for i in 0..8 {
        let pyc = mnt.join(format!("__pycache__/x{i}.cpython-311.pyc"));
        let done = done.clone();
        std::thread::spawn(move || {
            let _ = std::fs::read(&pyc);
            let _ = done.send(i);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for _ in 0..8 {
        let left = deadline.saturating_duration_since(Instant::now());
        if finished.recv_timeout(left).is_err() {
            abort_fuse_connection(&mnt);
            panic!(
                "the overlay hung on sources symlinked through it:\n{}",
                m.log()
            );
        }
    }
    let pyc = std::fs::read(mnt.join("__pycache__/real.cpython-311.pyc")).unwrap();
    assert!(pyc.len() > 16);
    assert_eq!(
        std::fs::read_to_string(mnt.join("x0.py")).unwrap(),
        "V = 1\n"
    );
    m.unmount();
}

/// Under `--over`, a symlinked source whose target comes back into the
/// tree (`lib/m.py -> ../share/m.py`, or an absolute path into the prefix)
/// passes through the tree's root, where the mount is: followed without
/// stepping into a pycstore mount, it still gets its pyc, from the tree
/// underneath. A mount point inside the prefix it would show is refused.
#[test]
fn overlay_over_follows_symlinks_back_into_the_tree() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let prefix = t.join("env");
    t.write("env/share/m.py", "M = 1\n");
    t.write("env/share/n.py", "N = 1\n");
    std::fs::create_dir(prefix.join("lib")).unwrap();
    std::os::unix::fs::symlink("../share/m.py", prefix.join("lib/m.py")).unwrap();
    std::os::unix::fs::symlink(prefix.join("share/n.py"), prefix.join("lib/n.py")).unwrap();
    let py = python("3.11");
    let inside = prefix.join("mnt");
    std::fs::create_dir(&inside).unwrap();
    let out = run(pycstore(&t.store())
        .args(["mount", "--source"])
        .arg(&prefix)
        .arg(&inside)
        .arg("--python")
        .arg(&py));
    assert_output!(
        out,
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("inside the prefix"),
        "a mount point inside the prefix was not refused"
    );
    std::fs::remove_dir(&inside).unwrap();
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &prefix,
        &[
            OsStr::new("--over"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    for name in ["m", "n"] {
        let pyc = prefix.join(format!("lib/__pycache__/{name}.cpython-311.pyc"));
        let read = std::fs::read(&pyc);
        assert!(
            read.as_ref().is_ok_and(|b| b.len() > 16),
            "{}: {read:?}",
            pyc.display()
        );
    }
    m.unmount();
}

/// Aborts the FUSE connection of the mount at `mountpoint` (fusectl,
/// mounted for the purpose if it is not), failing every request waiting on
/// it: a server whose own threads wait on it cannot end otherwise.
fn abort_fuse_connection(mountpoint: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mountpoint.to_str().unwrap();
    let Some(minor) = info.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4) == Some(&want)).then(|| fields[2].split(':').nth(1).unwrap().to_string())
    }) else {
        return;
    };
    let connections = Path::new("/sys/fs/fuse/connections");
    let mounted_here = std::fs::read_dir(connections).is_ok_and(|mut d| d.next().is_none())
        && Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(connections)
            .status()
            .is_ok_and(|s| s.success());
    let _ = std::fs::write(connections.join(&minor).join("abort"), "1");
    if mounted_here {
        let _ = Command::new("umount").arg(connections).status();
    }
    let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
}

/// The pycache-prefix view names a pyc after the path Python imported its
/// source by: a source reached through a symlinked directory (a merged
/// `/usr`, a venv's `lib64`) gets its pyc under that path too.
#[test]
fn pycache_prefix_follows_a_symlinked_directory() {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    t.write("real/module.py", "VALUE = 1\n");
    std::os::unix::fs::symlink(t.join("real"), t.join("linked")).unwrap();
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let py = python("3.11");
    let mut m = Mounted::start(
        &t,
        &t.store(),
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    for dir in ["real", "linked"] {
        let pyc = prefix
            .join(t.join(dir).strip_prefix("/").unwrap())
            .join("module.cpython-311.pyc");
        let read = std::fs::read(&pyc);
        assert!(
            read.as_ref().is_ok_and(|b| b.len() > 16),
            "{}: {read:?}",
            pyc.display()
        );
    }
    m.unmount();
}
