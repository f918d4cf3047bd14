//! Root linking trees that an unprivileged user owns and attacks: planted
//! temp names, directories swapped for symlinks mid-run, secrets behind
//! symlinks and modes, shared inodes handed over by `chown -R`, and sources
//! that are FIFOs, devices or huge. Each attack must leave everything
//! outside the prefix untouched and every pyc as readable as its source.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util::*;

/// `COMMAND` run as `nobody` (root ignores permission bits).
fn as_nobody(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program);
    cmd
}

fn chown_nobody(root: &Path) {
    run_ok(Command::new("chown").args(["-R", "65534:65534"]).arg(root));
}

/// A test dir others may enter (tempfile makes it 0700).
fn open_test_dir() -> TestDir {
    let t = TestDir::new();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

fn link(t: &TestDir, python: &Path, prefix: &Path, extra: &[&str]) -> serde_json::Value {
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(python)
            .args(extra)
            .arg(prefix),
    );
    assert_output!(out, out.status.success(), "link failed: {json}");
    json
}

/// Everything below `root` (path, file bytes or link target).
fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all: Vec<_> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .map(|e| {
            let bytes = if e.path_is_symlink() {
                std::fs::read_link(e.path())
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if e.file_type().is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            (e.path().to_path_buf(), bytes)
        })
        .collect();
    all.sort();
    all
}

#[test]
fn temp_names_planted_ahead_of_a_run_are_never_followed() {
    let python = system_python();
    let t = open_test_dir();
    let victim = t.write("victim.conf", "root's precious file\n");
    let names: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    for name in &names {
        t.write(format!("app/pkg/{name}.py"), format!("VALUE = {name:?}\n"));
    }
    std::fs::create_dir(t.join("app/pkg/__pycache__")).unwrap();
    chown_nobody(&t.join("app"));
    for mode in ["copy", "auto"] {
        // The names the old scheme used: .pycstore-NAME.PID.N.tmp, planted
        // as soon as the pid is known (the interpreter probe comes first).
        let child = t
            .pycstore()
            .args(["link", "--json", "--link-mode", mode, "--python"])
            .arg(&python)
            .arg(t.join("app"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        for name in &names {
            for n in 0..16 {
                let planted = t.join(format!(
                    "app/pkg/__pycache__/.pycstore-{name}.cpython-311.pyc.{pid}.{n}.tmp"
                ));
                let _ = std::os::unix::fs::symlink(&victim, planted);
            }
        }
        let out = child.wait_with_output().unwrap();
        assert_output!(out, out.status.success(), "link --link-mode {mode} failed");
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "root's precious file\n",
            "--link-mode {mode} wrote through a planted symlink"
        );
        let log = python_v(
            &python,
            &["-c", "import pkg.m0, pkg.m7; print(pkg.m7.VALUE)"],
            &[("PYTHONPATH", t.join("app").as_os_str())],
        );
        assert_nothing_compiled(&log, &t.join("app"), 2);
        std::fs::remove_dir_all(t.join("app/pkg/__pycache__")).unwrap();
        std::fs::create_dir(t.join("app/pkg/__pycache__")).unwrap();
        chown_nobody(&t.join("app"));
    }
}

/// `renameat2(RENAME_EXCHANGE)` of two names in `dir`.
fn exchange(dir: &Path, a: &str, b: &str) {
    let dir = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let a = CString::new(a).unwrap();
    let b = CString::new(b).unwrap();
    // SAFETY: three NUL-terminated strings that outlive the call; the fd is
    // only used by this call.
    unsafe {
        let fd = libc::open(dir.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
        assert!(fd >= 0);
        libc::renameat2(fd, a.as_ptr(), fd, b.as_ptr(), libc::RENAME_EXCHANGE);
        libc::close(fd);
    }
}

#[test]
fn directories_swapped_for_symlinks_mid_run_never_lead_outside() {
    swapped_directories_never_lead_outside(None);
}

/// The same with no room for a held descriptor (an open-file limit of 64,
/// below the reserve): every directory and `__pycache__` is opened again
/// for each write, beneath the root and checked to be the one found.
#[test]
fn swapped_directories_never_lead_outside_when_every_descriptor_is_reopened() {
    swapped_directories_never_lead_outside(Some(64));
}

/// Swaps a package directory and a symlink to root's directory outside the
/// prefix in a loop while `link` runs (under an open-file limit, if given):
/// nothing outside is ever written.
fn swapped_directories_never_lead_outside(open_file_limit: Option<u32>) {
    let python = system_python();
    let t = open_test_dir();
    // Root's directory outside the prefix, with a pycache of its own.
    for i in 0..40 {
        t.write(format!("outside/m{i}.py"), "ROOT = True\n");
    }
    t.write("outside/__pycache__/m0.cpython-311.pyc", "root's own pyc");
    for i in 0..40 {
        t.write(format!("app/pkg/m{i}.py"), format!("X = {i}\n"));
    }
    std::os::unix::fs::symlink(t.join("outside"), t.join("app/evil")).unwrap();
    chown_nobody(&t.join("app"));
    let before = snapshot(&t.join("outside"));
    let swaps = std::sync::atomic::AtomicU64::new(0);
    for round in 0..12 {
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    exchange(&t.join("app"), "pkg", "evil");
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            });
            let mut cmd = t.pycstore();
            cmd.args(["link", "-O", "0,1,2", "--python"])
                .arg(&python)
                .arg(t.join("app"));
            if let Some(limit) = open_file_limit {
                cmd = with_open_file_limit(&cmd, limit);
            }
            let out = run(&mut cmd);
            stop.store(true, Ordering::Relaxed);
            assert!(
                out.status.code().is_some_and(|c| c <= 1),
                "round {round}: {out:?}"
            );
        });
        // Start over (the swapper has stopped): whichever name the
        // directory has now.
        for name in ["pkg", "evil"] {
            let dir = t.join("app").join(name);
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::remove_dir_all(dir.join("__pycache__"));
            }
        }
    }
    assert!(
        swaps.load(Ordering::Relaxed) > 100,
        "the swapper did not run"
    );
    assert_eq!(
        snapshot(&t.join("outside")),
        before,
        "a run wrote outside the prefix"
    );
}

/// Sources of a new directory swapped, in a loop while root links it, for
/// symlinks to a root-only file: whatever the link read (a swapped-in
/// symlink is refused while the name was listed as a regular file, and
/// followed, like compileall, where the walk saw a symlink), no pyc
/// carrying the root-only bytes is readable by anyone but root. Read in
/// batches, as new sources are.
#[test]
fn sources_swapped_for_symlinks_to_root_files_mid_run_leak_nothing() {
    sources_swapped_for_symlinks_leak_nothing("1");
}

/// The same, read one by one (where io_uring cannot be used).
#[test]
fn sources_swapped_for_symlinks_to_root_files_mid_run_leak_nothing_read_one_by_one() {
    sources_swapped_for_symlinks_leak_nothing("0");
}

fn sources_swapped_for_symlinks_leak_nothing(io_uring: &str) {
    let python = system_python();
    let t = open_test_dir();
    let marker = "ROOT_ONLY_MARKER_5d1c";
    let key = t.write("rootonly/key.py", format!("KEY = '{marker}'\n"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let swaps = std::sync::atomic::AtomicU64::new(0);
    for round in 0..8 {
        // A new directory each round: its sources are new to the index.
        let app = t.join(format!("app{round}"));
        for i in 0..40 {
            t.write(app.join(format!("pkg/m{i}.py")), format!("X = {i}\n"));
            std::os::unix::fs::symlink(&key, app.join(format!("pkg/bait{i}"))).unwrap();
        }
        chown_nobody(&app);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..40 {
                        exchange(&app.join("pkg"), &format!("m{i}.py"), &format!("bait{i}"));
                    }
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            });
            let out = run(t
                .pycstore()
                .env("PYCSTORE_IO_URING", io_uring)
                .args(["link", "--python"])
                .arg(&python)
                .arg(&app));
            stop.store(true, Ordering::Relaxed);
            assert!(
                out.status.code().is_some_and(|c| c <= 1),
                "round {round}: {out:?}"
            );
        });
        for pyc in pycs_under(&app) {
            let pyc = app.join(pyc);
            let bytes = std::fs::read(&pyc).unwrap();
            if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                let meta = std::fs::metadata(&pyc).unwrap();
                assert_eq!(
                    meta.mode() & 0o077,
                    0,
                    "{} leaks root's file",
                    pyc.display()
                );
                assert_eq!(meta.uid(), 0, "{} leaks root's file", pyc.display());
            }
        }
    }
    assert!(swaps.load(Ordering::Relaxed) > 8, "the swapper did not run");
}

/// A source in a user's tree that is a hard link to a root-only file (made
/// where `fs.protected_hardlinks` is off, or before the file became root's):
/// its pyc is root's and readable by no one else, as the file is. A new
/// directory: read in batches.
#[test]
fn a_source_hard_linked_to_a_root_only_file_leaks_nothing() {
    source_hard_linked_to_a_root_only_file("1");
}

/// The same, read one by one (where io_uring cannot be used).
#[test]
fn a_source_hard_linked_to_a_root_only_file_leaks_nothing_read_one_by_one() {
    source_hard_linked_to_a_root_only_file("0");
}

fn source_hard_linked_to_a_root_only_file(io_uring: &str) {
    let python = system_python();
    let t = open_test_dir();
    let root_only = t.write("rootonly/key.py", "KEY = 'root only'\n");
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    t.write("user/pkg/mine.py", "MINE = 1\n");
    chown_nobody(&t.join("user"));
    // After the chown: a hard link is the root-only file itself.
    std::fs::hard_link(&root_only, t.join("user/pkg/leak.py")).unwrap();
    let out = run(t
        .pycstore()
        .env("PYCSTORE_IO_URING", io_uring)
        .args(["link", "--python"])
        .arg(&python)
        .arg(t.join("user")));
    assert_output!(out, out.status.success(), "link failed");
    let leak = t.join("user/pkg/__pycache__/leak.cpython-311.pyc");
    let meta = std::fs::metadata(&leak).unwrap();
    assert_eq!(
        meta.mode() & 0o077,
        0,
        "the pyc of a root-only file is readable by others"
    );
    assert_eq!(meta.uid(), 0, "the pyc of a root-only file is not root's");
    let out = run(as_nobody("cat").arg(&leak));
    assert!(
        !out.status.success(),
        "nobody read the pyc of a root-only file"
    );
    run_ok(as_nobody("cat").arg(t.join("user/pkg/__pycache__/mine.cpython-311.pyc")));
}

#[test]
fn a_pyc_is_never_more_readable_than_its_source() {
    let python = system_python();
    let t = open_test_dir();
    t.write("app/public.py", "PUBLIC = 1\n");
    let secret = t.write("app/secret.py", "PASSWORD = 'hunter2'\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A root-only file, and a user's tree with a source symlinked to it.
    let root_only = t.write("rootonly/key.py", "KEY = 'root only'\n");
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir(t.join("user")).unwrap();
    std::os::unix::fs::symlink(&root_only, t.join("user/leak.py")).unwrap();
    t.write("user/mine.py", "MINE = 1\n");
    chown_nobody(&t.join("user"));
    link(&t, &python, &t.join("app"), &[]);
    link(&t, &python, &t.join("user"), &[]);
    let pyc = |rel: &str| t.join(rel);
    for private in [
        "app/__pycache__/secret.cpython-311.pyc",
        "user/__pycache__/leak.cpython-311.pyc",
    ] {
        let meta = std::fs::metadata(pyc(private)).unwrap();
        assert_eq!(meta.mode() & 0o077, 0, "{private} is readable by others");
        assert_eq!(meta.uid(), 0, "{private} is not its source's owner's");
        let out = run(as_nobody("cat").arg(pyc(private)));
        assert!(!out.status.success(), "nobody read {private}");
    }
    for public in [
        "app/__pycache__/public.cpython-311.pyc",
        "user/__pycache__/mine.cpython-311.pyc",
    ] {
        run_ok(as_nobody("cat").arg(pyc(public)));
    }
    // Root imports the private module from its pyc; nobody imports the
    // public one from its pyc.
    let log = python_v(
        &python,
        &["-c", "import public, secret"],
        &[("PYTHONPATH", t.join("app").as_os_str())],
    );
    assert_nothing_compiled(&log, &t.join("app"), 2);
    let out = run(as_nobody(&python)
        .args(["-v", "-c", "import mine"])
        .env("PYTHONPATH", t.join("user"))
        .env_remove("PYTHONDONTWRITEBYTECODE"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.success() && stderr.contains("mine.cpython-311.pyc"),
        "nobody did not import mine from its pyc"
    );
}

#[test]
fn shared_inodes_only_in_the_store_owners_trees_and_a_chown_never_spreads() {
    let python = system_python();
    let t = open_test_dir();
    for dir in ["a", "b", "c"] {
        t.write(format!("{dir}/shared_mod.py"), "VALUE = 'good'\n");
    }
    chown_nobody(&t.join("b"));
    for dir in ["a", "b", "c"] {
        link(&t, &python, &t.join(dir), &["--link-mode", "auto"]);
    }
    let pyc = |dir: &str| t.join(dir).join("__pycache__/shared_mod.cpython-311.pyc");
    let ino = |dir: &str| std::fs::metadata(pyc(dir)).unwrap().ino();
    // Root's trees share the object's inode; nobody's tree has its own.
    assert_eq!(ino("a"), ino("c"));
    assert_ne!(ino("a"), ino("b"));
    assert_eq!(std::fs::metadata(pyc("b")).unwrap().nlink(), 1);
    // A Dockerfile's `chown -R app:app` of one root tree hands the shared
    // inode to the user; the next link of another tree stops sharing it.
    chown_nobody(&t.join("c"));
    let json = link(&t, &python, &t.join("a"), &[]);
    assert_eq!(json["failed"], 0, "{json}");
    let a = std::fs::metadata(pyc("a")).unwrap();
    assert_eq!(a.uid(), 0, "a's pyc still belongs to the user");
    assert_ne!(a.ino(), ino("c"));
    // The user rewrites the pyc through their tree: a's import is unharmed.
    let evil = run(as_nobody("sh")
        .arg("-c")
        .arg("chmod u+w \"$0\" && printf 'not a pyc' > \"$0\"")
        .arg(pyc("c")));
    assert!(evil.status.success(), "{evil:?}");
    let log = python_v(
        &python,
        &["-c", "import shared_mod; assert shared_mod.VALUE == 'good'"],
        &[("PYTHONPATH", t.join("a").as_os_str())],
    );
    assert_nothing_compiled(&log, &t.join("a"), 1);
}

#[test]
fn fifos_devices_and_huge_sources_are_reported_and_skipped() {
    fifos_devices_and_huge_sources_read("1");
}

/// The same, with sources read one by one (where io_uring cannot be used).
#[test]
fn fifos_devices_and_huge_sources_are_reported_and_skipped_read_one_by_one() {
    fifos_devices_and_huge_sources_read("0");
}

fn fifos_devices_and_huge_sources_read(io_uring: &str) {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/ok.py", "OK = 1\n");
    t.write("app/big.py", format!("X = '{}'\n", "x".repeat(4096)));
    run_ok(Command::new("mkfifo").arg(t.join("app/fifo.py")));
    run_ok(
        Command::new("mknod")
            .arg(t.join("app/zero.py"))
            .args(["c", "1", "5"]),
    );
    std::os::unix::fs::symlink(t.join("app/fifo.py"), t.join("app/to_fifo.py")).unwrap();
    let sparse = std::fs::File::create(t.join("app/sparse.py")).unwrap();
    sparse.set_len(1200 << 20).unwrap();
    // Under a 2 GiB address-space limit and a watchdog: reading the FIFO
    // would hang, the device or the sparse file would need gigabytes.
    let started = Instant::now();
    let out = run(Command::new("timeout")
        .arg("120")
        .args(["prlimit", "--as=2147483648", "--"])
        .arg(env!("CARGO_BIN_EXE_pycstore"))
        .env("PYCSTORE_IO_URING", io_uring)
        .arg("--store")
        .arg(t.store())
        .args(["link", "--json", "--max-source-size", "2K", "--python"])
        .arg(&python)
        .arg(t.join("app")));
    assert!(started.elapsed() < Duration::from_secs(110), "link hung");
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {out:?}"));
    assert_eq!(out.status.code(), Some(1), "{json}");
    let failures = json["failures"].as_array().unwrap();
    let message = |name: &str| -> String {
        failures
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} not reported: {json}"))["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for name in ["fifo.py", "zero.py", "to_fifo.py"] {
        assert!(message(name).contains("not a regular file"), "{json}");
    }
    for name in ["sparse.py", "big.py"] {
        assert!(message(name).contains("--max-source-size"), "{json}");
    }
    assert!(t.join("app/__pycache__/ok.cpython-311.pyc").exists());
    // The default limit (64 MiB) takes the 4 KiB source.
    for name in ["sparse.py", "fifo.py", "zero.py", "to_fifo.py"] {
        std::fs::remove_file(t.join("app").join(name)).unwrap();
    }
    let json = link(&t, &python, &t.join("app"), &[]);
    assert!(
        t.join("app/__pycache__/big.cpython-311.pyc").exists(),
        "{json}"
    );
}

/// A tree as deep as a user can make one inside a prefix (1,500 levels,
/// each with a sibling directory, so that a walk run on several threads
/// would hand the recursion to its workers' smaller stacks) is walked to
/// its bottom, by `link` and `status`, without exhausting a stack.
#[test]
fn a_deep_tree_is_walked_without_exhausting_the_stack() {
    let python = python("3.11");
    let t = TestDir::new();
    let mut dir = String::from("deep");
    for _ in 0..1_500 {
        std::fs::create_dir_all(t.join(format!("{dir}/e"))).unwrap();
        dir.push_str("/d");
    }
    t.write(format!("{dir}/bottom.py"), "DEEP = True\n");
    t.write("deep/top.py", "TOP = True\n");
    let json = link(&t, &python, &t.join("deep"), &[]);
    assert_eq!(json["failed"], 0, "{json}");
    assert_eq!(json["compiled"], 2, "{json}");
    let pycs = pycs_under(&t.join("deep"));
    assert_eq!(pycs.len(), 2, "{pycs:?}");
    assert!(pycs
        .iter()
        .any(|p| p.to_string_lossy().contains("bottom.cpython-311.pyc")));
    let out = run_ok(
        t.pycstore()
            .args(["status", "--json", "--python"])
            .arg(&python)
            .arg(t.join("deep")),
    );
    assert!(out.status.success());
}

#[test]
fn names_up_to_the_filesystem_limit_are_linked() {
    let python = python("3.11");
    let t = TestDir::new();
    // 237 + ".cpython-311.pyc" = 253 bytes: the longest pyc name ext4 takes.
    let module = "m".repeat(237);
    t.write(format!("app/{module}.py"), "LONG = True\n");
    let json = link(&t, &python, &t.join("app"), &[]);
    assert_eq!(json["failed"], 0, "{json}");
    let log = python_v(
        &python,
        &["-c", &format!("import {module}")],
        &[("PYTHONPATH", t.join("app").as_os_str())],
    );
    assert_nothing_compiled(&log, &t.join("app"), 1);
}

#[test]
fn unlink_never_follows_a_directory_swapped_for_a_symlink() {
    let python = system_python();
    let t = open_test_dir();
    t.write("app/pkg/m.py", "X = 1\n");
    chown_nobody(&t.join("app"));
    link(&t, &python, &t.join("app"), &[]);
    // Root's copy of the tree elsewhere holds the same pyc bytes.
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(t.join("app/pkg"))
            .arg(t.join("other")),
    );
    run_ok(
        Command::new("chown")
            .args(["-R", "0:0"])
            .arg(t.join("other")),
    );
    let before = snapshot(&t.join("other"));
    // The user swaps their package directory for a symlink to root's copy.
    std::fs::rename(t.join("app/pkg"), t.join("app/old")).unwrap();
    std::os::unix::fs::symlink(t.join("other"), t.join("app/pkg")).unwrap();
    let out = run(t.pycstore().args(["unlink", "--json"]).arg(t.join("app")));
    assert_eq!(
        snapshot(&t.join("other")),
        before,
        "unlink removed a file outside the prefix: {out:?}"
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["removed"], 0, "{json}");
}
