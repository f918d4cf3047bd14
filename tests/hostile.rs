//! Bad input and hostile conditions: each is a report naming the file, never
//! a crash, and never a wrong or partial pyc.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::util::*;

#[test]
fn empty_and_huge_sources() {
    empty_and_huge_sources_read("1");
}

/// The same, with sources read one by one (where io_uring cannot be used).
#[test]
fn empty_and_huge_sources_read_one_by_one() {
    empty_and_huge_sources_read("0");
}

fn empty_and_huge_sources_read(io_uring: &str) {
    let t = TestDir::new();
    let python = python("3.11");
    t.write("app/empty.py", "");
    // 50 MB: mostly comments, and a function at the end.
    let mut big = "# padding line of a generated module, kept to make the file large\n"
        .repeat(50 * 1024 * 1024 / 66);
    big.push_str("def last():\n    return 'end of a 50 MB module'\n");
    t.write("app/big.py", &big);
    let app = t.join("app");
    let (out, json) = link_json(
        t.pycstore()
            .env("PYCSTORE_IO_URING", io_uring)
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_output!(out, out.status.success(), "link failed: {json}");
    assert_eq!(json["compiled"], 2, "{json}");
    let log = python_v(
        &python,
        &["-c", "import empty, big; print(big.last())"],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, &app, 2);
    assert!(String::from_utf8_lossy(&log.output.stdout).contains("end of a 50 MB module"));
}

#[test]
fn symlink_loops_and_dangling_links_are_skipped() {
    let t = TestDir::new();
    let python = python("3.11");
    t.write("app/ok.py", "X = 1\n");
    let app = t.join("app");
    std::os::unix::fs::symlink("loop.py", app.join("loop.py")).unwrap();
    std::os::unix::fs::symlink("nowhere.py", app.join("dangling.py")).unwrap();
    std::os::unix::fs::symlink(".", app.join("dirloop")).unwrap();
    std::os::unix::fs::symlink("b", app.join("a")).unwrap();
    std::os::unix::fs::symlink("a", app.join("b")).unwrap();
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_output!(out, out.status.success(), "link failed: {json}");
    assert_eq!(
        (json["sources"].as_u64(), json["compiled"].as_u64()),
        (Some(1), Some(1)),
        "{json}"
    );
}

/// Sources rewritten while being linked: whatever is left in the prefix is
/// valid for the source it sits beside, or Python recompiles it (checked
/// hash); once the writes stop, one more link makes everything current.
#[test]
fn sources_changing_during_the_walk() {
    sources_changing_during_the_walk_read("1");
}

/// The same, with sources read one by one (where io_uring cannot be used).
#[test]
fn sources_changing_during_the_walk_read_one_by_one() {
    sources_changing_during_the_walk_read("0");
}

fn sources_changing_during_the_walk_read(io_uring: &str) {
    let t = TestDir::new();
    let python = python("3.11");
    for i in 0..200 {
        t.write(format!("app/m{i}.py"), format!("VALUE = {i}\n"));
    }
    let app = t.join("app");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let app = app.clone();
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for i in (0..200).step_by(3) {
                    let path = app.join(format!("m{i}.py"));
                    if round.is_multiple_of(2) {
                        let _ = std::fs::remove_file(&path);
                    }
                    std::fs::write(&path, format!("VALUE = {}\n", i as u64 + 1000 * round))
                        .unwrap();
                }
            }
            round
        })
    };
    for _ in 0..5 {
        let out = run(t
            .pycstore()
            .env("PYCSTORE_IO_URING", io_uring)
            .args(["link", "-q", "--python"])
            .arg(&python)
            .arg(&app));
        assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(
        writer.join().unwrap() > 1,
        "the writer did not overlap the links"
    );
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_output!(out, out.status.success(), "the final link failed: {json}");
    let script = "import importlib, sys\n\
                  for i in range(200):\n\
                  \x20   m = importlib.import_module('m%d' % i)\n\
                  \x20   want = int(open('%s/m%d.py' % (sys.argv[1], i)).read().split('=')[1])\n\
                  \x20   assert m.VALUE == want, (i, m.VALUE, want)\n";
    let log = python_v(
        &python,
        &["-c", script, app.to_str().unwrap()],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, &app, 200);
}

/// Runs pycstore as an unprivileged user (root ignores permission bits).
fn as_nobody(store: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_pycstore"))
        .arg("--store")
        .arg(store);
    cmd
}

fn chown_tree(root: &Path) {
    run_ok(Command::new("chown").args(["-R", "65534:65534"]).arg(root));
}

#[test]
fn unreadable_files_and_directories_are_reported() {
    unreadable_files_and_directories_are_reported_read("1");
}

/// The same, with sources read one by one (where io_uring cannot be used).
#[test]
fn unreadable_files_and_directories_are_reported_read_one_by_one() {
    unreadable_files_and_directories_are_reported_read("0");
}

fn unreadable_files_and_directories_are_reported_read(io_uring: &str) {
    let t = TestDir::new();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let python = system_python();
    t.write("app/ok.py", "X = 1\n");
    let secret = t.write("app/secret.py", "X = 2\n");
    t.write("app/locked/inner.py", "X = 3\n");
    let app = t.join("app");
    chown_tree(&app);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(app.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let store = t.join("nobody-store");
    std::fs::create_dir(&store).unwrap();
    chown_tree(&store);
    let out = run(as_nobody(&store)
        .env("PYCSTORE_IO_URING", io_uring)
        .args(["link", "--json", "--python"])
        .arg(&python)
        .arg(&app));
    std::fs::set_permissions(app.join("locked"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["compiled"], 1, "{json}");
    let failures = json["failures"].as_array().unwrap();
    let paths: Vec<&str> = failures
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(paths.iter().any(|p| p.ends_with("secret.py")), "{json}");
    assert!(paths.iter().any(|p| p.ends_with("locked")), "{json}");
    assert!(
        failures
            .iter()
            .all(|f| f["message"].as_str().unwrap().contains("ermission denied")),
        "{json}"
    );
}

#[test]
fn a_read_only_prefix_is_reported_per_file() {
    let t = TestDir::new();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let python = system_python();
    t.write("app/a.py", "X = 1\n");
    t.write("app/pkg/b.py", "X = 2\n");
    let app = t.join("app");
    let store = t.join("nobody-store");
    std::fs::create_dir(&store).unwrap();
    chown_tree(&store);
    // The prefix belongs to root: nobody can read it but not write it.
    let out = run(as_nobody(&store)
        .args(["link", "--json", "--python"])
        .arg(&python)
        .arg(&app));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["failed"], 2, "{json}");
    assert!(pycs_under(&app).is_empty());
    // The store kept what was compiled: the owner's link is all hits.
    let (_, json) = link_json(
        as_nobody(&store)
            .args(["status", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(json["sources"], 2, "{json}");
}

/// A small tmpfs, mounted for the test; None (and a loud skip) when this
/// user cannot mount.
pub(crate) struct Tmpfs {
    pub(crate) path: PathBuf,
}

impl Tmpfs {
    pub(crate) fn mount(t: &TestDir, name: &str, size: &str) -> Option<Tmpfs> {
        let path = t.join(name);
        std::fs::create_dir(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip(&format!(
                "cannot mount a tmpfs at {} (run as root)",
                path.display()
            ));
            return None;
        }
        Some(Tmpfs { path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Inodes in use on the filesystem at `path`.
fn inodes_used(path: &Path) -> u64 {
    let out = run_ok(Command::new("df").args(["--output=iused"]).arg(path));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no inode count from df: {out:?}"))
}

/// A filesystem that runs out of room as an index session ends used to
/// leave the process waiting for ever in RocksDB: with `paranoid_checks`
/// off, as the index runs, a flush of the session's memtable that fails for
/// lack of space (here, of an inode for its table file) is no error to it,
/// and is not tried again. The session now ends with an error that says so,
/// and nothing is lost: what it wrote is in the write-ahead log, which the
/// next session takes up.
#[test]
fn an_index_session_that_cannot_flush_as_it_ends_says_so_and_loses_nothing() {
    use pycstore_store::index::{Counters, Index, Writes};
    let t = TestDir::new();
    let Some(small) = Tmpfs::mount(&t, "small", "64m") else {
        return;
    };
    let path = small.path.join("index-v2");
    let write = |label: &str| {
        let mut index = Index::open(&path).unwrap();
        let mut writes = Writes::default();
        let counters = Counters {
            hits: 7,
            ..Counters::default()
        };
        writes.count(label, counters);
        index.apply(writes).unwrap();
        index
    };
    write("before").close().unwrap();
    let index = write("kept");
    // One inode left: the memtable's switch takes it (a new write-ahead
    // log), and the flush's table finds none.
    let limit = inodes_used(&small.path) + 1;
    run_ok(
        Command::new("mount")
            .args(["-o", &format!("remount,nr_inodes={limit}")])
            .arg(&small.path),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(index.close()).unwrap());
    let closed = rx.recv_timeout(std::time::Duration::from_secs(60));
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,nr_inodes=100000"])
            .arg(&small.path),
    );
    let closed = closed.expect("the session did not end in 60 s");
    let message = closed
        .expect_err("a flush without an inode failed")
        .to_string();
    assert!(
        message.contains("cannot flush the index")
            && message.contains("the filesystem is full")
            && message.contains("kept in its write-ahead log")
            && message.contains("free some space on that filesystem"),
        "{message}"
    );
    // The next session has what the failed one wrote.
    let index = Index::open(&path).unwrap();
    assert_eq!(index.counters("kept").unwrap().hits, 7);
    assert_eq!(index.counters("before").unwrap().hits, 7);
    index.close().unwrap();
}

/// A library that makes every new table file (`*.sst`) fail to be created
/// with ENOSPC, loaded into a command with `LD_PRELOAD`: the index opens
/// and takes writes (its log, manifest and options are no tables), and
/// every flush fails, as on a filesystem that has just filled up.
fn no_space_for_tables(t: &TestDir) -> PathBuf {
    const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>

/* The mode is an argument only when a file may be made. */
static int takes_mode(int flags) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
}

static int refused(const char *path, int flags) {
    size_t n = strlen(path);
    if ((flags & O_CREAT) && n > 4 && strcmp(path + n - 4, ".sst") == 0) {
        errno = ENOSPC;
        return 1;
    }
    return 0;
}

/* Every open goes to the real openat (AT_FDCWD for a path alone). */
static int forward(int dir, const char *path, int flags, int mode) {
    static int (*real)(int, const char *, int, ...);
    if (refused(path, flags)) return -1;
    if (!real) real = dlsym(RTLD_NEXT, "openat");
    return real(dir, path, flags, mode);
}

#define MODE(flags)                                                       \
    int mode = 0;                                                         \
    va_list ap;                                                           \
    va_start(ap, flags);                                                  \
    if (takes_mode(flags)) mode = va_arg(ap, int);                        \
    va_end(ap)

int open(const char *path, int flags, ...) { MODE(flags); return forward(AT_FDCWD, path, flags, mode); }
int open64(const char *path, int flags, ...) { MODE(flags); return forward(AT_FDCWD, path, flags, mode); }
int openat(int dir, const char *path, int flags, ...) { MODE(flags); return forward(dir, path, flags, mode); }
int openat64(int dir, const char *path, int flags, ...) { MODE(flags); return forward(dir, path, flags, mode); }
"#;
    let source = t.join("no-space-for-tables.c");
    std::fs::write(&source, SHIM).unwrap();
    let library = t.join("no-space-for-tables.so");
    run_ok(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&library)
            .arg(&source)
            .arg("-ldl"),
    );
    library
}

/// Every command that writes to the index ends its session by flushing,
/// and says so when that fails: here `stats --zero`, whose reset used to be
/// reported done (exit 0) while its flush failed, and `gc`. Nothing is
/// lost: what they wrote waits in the write-ahead log, and the next
/// session has it; the gc's files are removed all the same.
#[test]
fn a_command_whose_index_flush_fails_says_so_and_loses_nothing() {
    let t = TestDir::new();
    let venv = t.join("venv");
    make_venv(&python("3.11"), &venv);
    run_ok(t.pycstore().arg("link").arg("-q").arg(&venv));
    let usage = |out: &std::process::Output| {
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            json["usage"].as_object().unwrap().len(),
            json["since"].as_u64().unwrap(),
        )
    };
    let (labels, since) = usage(&run_ok(t.pycstore().args(["stats", "--json"])));
    assert!(labels > 0 && since == 0, "the link counted its work");

    let out = run(t
        .pycstore()
        .env("LD_PRELOAD", no_space_for_tables(&t))
        .args(["stats", "--zero"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        !out.status.success()
            && stderr.contains("cannot flush the index")
            && stderr.contains("index-v2")
            && stderr.contains("kept in its write-ahead log"),
        "a reset whose flush failed is reported"
    );
    let (labels, since) = usage(&run_ok(t.pycstore().args(["stats", "--json"])));
    assert!(
        labels == 0 && since > 0,
        "the reset was kept: {labels} labels, since {since}"
    );

    // A gc whose flush fails still removes the objects it evicts (a full
    // disk is when it is run), and says so after.
    let held = |out: &std::process::Output| {
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            json["objects"].as_u64().unwrap(),
            json["entries"].as_u64().unwrap(),
        )
    };
    let (objects, entries) = held(&run_ok(t.pycstore().args(["stats", "--json"])));
    assert!(
        objects > 0 && entries > 0,
        "{objects} objects, {entries} entries"
    );
    // The reset still waits in the log: a read-write session flushes it as
    // it opens (with the library loaded, that open would fail for room).
    run_ok(t.pycstore().args(["gc", "--dry-run"]));
    let out = run(t
        .pycstore()
        .env("LD_PRELOAD", no_space_for_tables(&t))
        .args(["gc", "--max-size", "0"]));
    assert_output!(
        out,
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("cannot flush the index"),
        "a gc whose flush failed is reported"
    );
    let (objects, entries) = held(&run_ok(t.pycstore().args(["stats", "--json"])));
    assert_eq!(
        (objects, entries),
        (0, 0),
        "the evicted objects went, and their entries with them"
    );
}

/// `verify --repair` whose flush fails still removes the damaged pycs whose
/// records it deleted (they would otherwise stay, no longer recorded, where
/// no later `verify` looks), and says so after.
#[test]
fn a_repair_whose_index_flush_fails_still_repairs_the_files() {
    let t = TestDir::new();
    t.write("app/pkg/__init__.py", "");
    t.write(
        "app/pkg/m0.py",
        "VALUE = 0\n\n\ndef f(x):\n    return x + VALUE\n",
    );
    let app = t.join("app");
    run_ok(
        t.pycstore()
            .args(["link", "-q", "--link-mode", "hardlink", "--python"])
            .arg(python("3.11"))
            .arg(&app),
    );
    // The pyc is a hard link of its object: one bit flipped damages both.
    let pyc = app.join("pkg/__pycache__/m0.cpython-311.pyc");
    let mut bytes = std::fs::read(&pyc).unwrap();
    bytes[40] ^= 0x01;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pyc)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .unwrap();

    let out = run(t
        .pycstore()
        .env("LD_PRELOAD", no_space_for_tables(&t))
        .args(["verify", "--repair"]));
    assert_output!(
        out,
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("cannot flush the index"),
        "a repair whose flush failed is reported"
    );
    assert!(!pyc.exists(), "the damaged pyc was removed all the same");
    let out = run(t.pycstore().arg("verify"));
    assert_output!(out, out.status.success(), "the store verifies clean after");
}

#[test]
fn a_full_disk_leaves_nothing_half_written() {
    let t = TestDir::new();
    let Some(small) = Tmpfs::mount(&t, "small", "8m") else {
        return;
    };
    let venv = t.join("venv");
    make_venv(&python("3.11"), &venv);
    // The store fills up: per-file errors, no partial object, no partial pyc.
    let store = small.path.join("store");
    let (out, json) = link_json(pycstore(&store).arg("link").arg(&venv));
    assert_eq!(out.status.code(), Some(1), "{json}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = json["failures"].as_array().is_some_and(|f| {
        f.iter().any(|f| {
            f["message"]
                .as_str()
                .unwrap_or("")
                .contains("No space left")
        })
    }) || stderr.contains("No space left");
    assert!(said, "no clear ENOSPC message: {json} {stderr}");
    assert_objects_whole(&store);
    assert_pyc_files_whole(&venv);

    // The prefix fills up (the store elsewhere: pycs are copied across).
    let Some(tiny) = Tmpfs::mount(&t, "tiny", "1m") else {
        return;
    };
    let prefix = tiny.path.join("prefix");
    for i in 0..150 {
        let body = format!("def f{i}_{{n}}(x):\n    return [x, {i}, 'text']\n");
        let text: String = (0..60)
            .map(|n| body.replace("{n}", &n.to_string()))
            .collect();
        std::fs::create_dir_all(&prefix).unwrap();
        std::fs::write(prefix.join(format!("m{i}.py")), text).unwrap();
    }
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(python("3.11"))
            .arg(&prefix),
    );
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert!(
        json["failures"][0]["message"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{json}"
    );
    assert!(json["compiled"].as_u64().unwrap() > 0, "{json}");
    assert_pyc_files_whole(&prefix);
    assert_objects_whole(&t.store());
    // Nothing was left behind under a temporary name.
    let temps: Vec<_> = walkdir::WalkDir::new(&prefix)
        .into_iter()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pycstore-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

/// Every object's bytes hash to its name.
fn assert_objects_whole(store: &Path) {
    for entry in walkdir::WalkDir::new(store.join("objects-v1"))
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            let name: String = entry
                .path()
                .components()
                .rev()
                .take(2)
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                name,
                "{}",
                entry.path().display()
            );
        }
    }
}

fn assert_pyc_files_whole(root: &Path) {
    let script = "import marshal, os, sys\n\
                  for d, _, fs in os.walk(sys.argv[1]):\n\
                  \x20   for f in fs:\n\
                  \x20       if f.endswith('.pyc'):\n\
                  \x20           marshal.loads(open(os.path.join(d, f), 'rb').read()[16:])\n";
    run_ok(
        Command::new(python("3.11"))
            .args(["-I", "-c", script])
            .arg(root),
    );
}

#[test]
fn a_damaged_object_is_never_placed() {
    let t = TestDir::new();
    let python = python("3.11");
    t.write("a/m.py", "X = 'the right module'\n");
    t.write("b/m.py", "X = 'the right module'\n");
    run_ok(
        t.pycstore()
            .args(["link", "--link-mode", "copy", "--python"])
            .arg(&python)
            .arg(t.join("a")),
    );
    let object = walkdir::WalkDir::new(t.store().join("objects-v1"))
        .into_iter()
        .flatten()
        .find(|e| e.file_type().is_file())
        .unwrap()
        .into_path();
    // Flip a bit in the header's source hash.
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[9] ^= 0x40;
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&object, &bytes).unwrap();
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(t.join("b")),
    );
    assert_output!(out, out.status.success(), "{json}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match its index entry"),
        "{out:?}"
    );
    assert_eq!(json["compiled"], 1, "{json}");
    let b = t.join("b");
    let log = python_v(
        &python,
        &["-c", "import m; print(m.X)"],
        &[("PYTHONPATH", b.as_os_str())],
    );
    assert_nothing_compiled(&log, &b, 1);
    assert_ne!(
        std::fs::read(b.join("__pycache__/m.cpython-311.pyc")).unwrap(),
        bytes
    );
}
