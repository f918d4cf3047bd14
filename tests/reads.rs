//! New sources read in batches through io_uring, and one by one where it
//! cannot be used (`PYCSTORE_IO_URING=0` stands for a kernel or sandbox
//! without it): the same report, the same pycs, and the same stat-cache
//! records, in fewer syscalls.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::util::*;

const DIRS: usize = 12;
const PER_DIR: usize = 25;
const SOURCES: usize = DIRS * PER_DIR;

/// The calls `cmd` made, by name, every thread together (`strace -f -c`),
/// and its output.
fn counted(t: &TestDir, name: &str, cmd: &Command) -> (HashMap<String, u64>, serde_json::Value) {
    counted_as(t, name, cmd, |_| {})
}

/// [`counted`], with `prepare` applied to the `strace` command (which runs
/// `cmd` as its child).
fn counted_as(
    t: &TestDir,
    name: &str,
    cmd: &Command,
    prepare: impl FnOnce(&mut Command),
) -> (HashMap<String, u64>, serde_json::Value) {
    let counts = t.join(format!("{name}.strace"));
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-c", "-o"])
        .arg(&counts)
        .arg(cmd.get_program());
    strace.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => strace.env(key, value),
            None => strace.env_remove(key),
        };
    }
    prepare(&mut strace);
    let out = run(&mut strace);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{name}: no JSON ({e}): {out:?}"));
    assert_output!(out, out.status.success(), "{name}: {json}");
    let table = std::fs::read_to_string(&counts).unwrap();
    let calls = table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            let calls = fields.get(3)?.parse().ok()?;
            Some((fields.last()?.to_string(), calls))
        })
        .collect();
    (calls, json)
}

fn link(t: &TestDir, python: &Path, prefix: &Path, io_uring: &str) -> Command {
    let mut cmd = t.pycstore();
    cmd.env("PYCSTORE_IO_URING", io_uring)
        .args(["link", "--json", "--python"])
        .arg(python)
        .arg(prefix);
    cmd
}

fn copy(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// What a report says of the sources and pycs (not its times).
fn summary(json: &serde_json::Value) -> Vec<(&'static str, serde_json::Value)> {
    [
        "sources",
        "pycs",
        "up_to_date",
        "hits",
        "compiled",
        "failed",
        "skipped",
    ]
    .into_iter()
    .map(|field| (field, json[field].clone()))
    .collect()
}

#[test]
fn new_sources_are_read_in_batches_and_give_what_reads_one_by_one_give() {
    if std::env::var_os("PYCSTORE_IO_URING").is_some_and(|v| v == "0") {
        skip("PYCSTORE_IO_URING=0 says io_uring is unavailable here");
        return;
    }
    if which("strace").is_none() {
        skip("strace is not installed (scripts/setup installs it)");
        return;
    }
    let python = python("3.11");
    let t = TestDir::new();
    for d in 0..DIRS {
        for m in 0..PER_DIR {
            t.write(
                format!("tree/pkg{d}/m{m}.py"),
                format!("VALUE = {}\nNAME = 'pkg{d}.m{m}'\n", d * 1000 + m),
            );
        }
    }
    // The store learns every pyc from a first copy.
    let (tree, batched, by_one) = (t.join("tree"), t.join("batched"), t.join("by-one"));
    copy(&tree, &by_one);
    copy(&tree, &batched);
    run_ok(&mut link(&t, &python, &tree, "1"));

    // Fresh copies: every directory is new to the index.
    let (calls, json) = counted(&t, "batched", &link(&t, &python, &batched, "1"));
    let (by_one_calls, by_one_json) = counted(&t, "by-one", &link(&t, &python, &by_one, "0"));
    assert_eq!(
        summary(&json),
        summary(&by_one_json),
        "{json}\n{by_one_json}"
    );
    assert_eq!(json["sources"], SOURCES, "{json}");
    assert_eq!(json["hits"], SOURCES, "{json}");
    let count = |calls: &HashMap<String, u64>, name: &str| calls.get(name).copied().unwrap_or(0);
    // One by one: an `openat`, `fstat`, `read` and `close` a source. In
    // batches: an `fstat` a source and two `io_uring_enter`s a batch of up
    // to 64, and no source opened, read or closed by a call of its own.
    // (The rest, the same in both, is the index's files, the interpreter's
    // probe, the directories.)
    assert_eq!(
        count(&by_one_calls, "io_uring_enter"),
        0,
        "{by_one_calls:?}"
    );
    let enters = count(&calls, "io_uring_enter");
    assert!(
        enters > 0 && enters <= 2 * 2 * DIRS as u64,
        "io_uring not in use (where it is unavailable, PYCSTORE_IO_URING=0 skips this test): {calls:?}"
    );
    for call in ["openat", "read", "close"] {
        let fewer = count(&by_one_calls, call).saturating_sub(count(&calls, call));
        assert!(
            fewer >= SOURCES as u64 * 9 / 10,
            "{call}: {calls:?}\none by one: {by_one_calls:?}"
        );
    }

    // The same objects, placed beside the same sources.
    let pycs = pycs_under(&batched);
    assert_eq!(pycs.len(), SOURCES);
    assert_eq!(pycs, pycs_under(&by_one));
    for pyc in &pycs {
        let ino = |root: &Path| std::fs::metadata(root.join(pyc)).unwrap().ino();
        assert_eq!(ino(&batched), ino(&by_one), "{} differs", pyc.display());
    }
    let modules: Vec<String> = (0..DIRS)
        .flat_map(|d| (0..PER_DIR).map(move |m| format!("pkg{d}.m{m}")))
        .collect();
    let script = format!(
        "import importlib\nfor name in {modules:?}:\n    assert importlib.import_module(name).NAME == name\n"
    );
    let log = python_v(
        &python,
        &["-c", &script],
        &[("PYTHONPATH", batched.as_os_str())],
    );
    assert_nothing_compiled(&log, &batched, SOURCES);

    // What the batched reads recorded is what a `stat` of each source
    // says: linking the copy again reads none of them.
    let (again, json) = counted(&t, "again", &link(&t, &python, &batched, "1"));
    assert_eq!(json["up_to_date"], SOURCES, "{json}");
    assert_eq!(count(&again, "io_uring_enter"), 0, "{again:?}");
    let fewer = count(&by_one_calls, "read").saturating_sub(count(&again, "read"));
    assert!(fewer >= SOURCES as u64 * 9 / 10, "{again:?}");
}

/// `program` on `PATH`, if there.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// Makes `io_uring_setup` fail with `EPERM` in the process `cmd` starts
/// and its children, as the default seccomp profile of Docker and Podman
/// does.
fn refuse_io_uring(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls `prctl`, on memory of its own stack.
    unsafe {
        cmd.pre_exec(|| {
            // Classic BPF: load the call's number; io_uring_setup (425,
            // the same number on every architecture) gets EPERM, anything
            // else is allowed.
            let filter = [
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 0,
                }, // ld [nr]
                libc::sock_filter {
                    code: 0x15, // jeq
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_io_uring_setup as u32,
                },
                libc::sock_filter {
                    code: 0x06, // ret
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ALLOW,
                },
            ];
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Where a seccomp profile refuses io_uring (a container's), new sources
/// are read one by one: the same link, and Python compiles nothing.
#[test]
fn where_a_seccomp_profile_refuses_io_uring_sources_are_read_one_by_one() {
    if which("strace").is_none() {
        skip("strace is not installed (scripts/setup installs it)");
        return;
    }
    let python = python("3.11");
    let t = TestDir::new();
    for d in 0..3 {
        for m in 0..PER_DIR {
            t.write(
                format!("tree/pkg{d}/m{m}.py"),
                format!("VALUE = {}\n", d * 100 + m),
            );
        }
    }
    let (tree, fresh) = (t.join("tree"), t.join("fresh"));
    copy(&tree, &fresh);
    run_ok(&mut link(&t, &python, &tree, "1"));
    let cmd = link(&t, &python, &fresh, "1");
    let (calls, json) = counted_as(&t, "seccomp", &cmd, refuse_io_uring);
    let sources = 3 * PER_DIR;
    assert_eq!(json["hits"], sources, "{json}");
    assert_eq!(json["failed"], 0, "{json}");
    let count = |name: &str| calls.get(name).copied().unwrap_or(0);
    // Asked, refused (twice at most by each thread: with the flags of
    // kernels from 6.1, then without), and not asked again for each batch.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let setups = count("io_uring_setup");
    assert!(setups >= 1 && setups <= 2 * threads, "{calls:?}");
    assert_eq!(count("io_uring_enter"), 0, "{calls:?}");
    assert!(count("openat") >= sources as u64, "{calls:?}");
    assert_eq!(pycs_under(&fresh).len(), sources);
    let modules: Vec<String> = (0..3)
        .flat_map(|d| (0..PER_DIR).map(move |m| format!("pkg{d}.m{m}")))
        .collect();
    let script =
        format!("import importlib\nfor name in {modules:?}:\n    importlib.import_module(name)\n");
    let log = python_v(
        &python,
        &["-c", &script],
        &[("PYTHONPATH", fresh.as_os_str())],
    );
    assert_nothing_compiled(&log, &fresh, sources);
}
