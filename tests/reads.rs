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
