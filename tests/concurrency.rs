//! Many processes on one store at once, and processes killed at random
//! moments: every one succeeds or loses only its own work in flight; no
//! partial pyc is ever visible; every prefix imports with nothing recompiled.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::*;

const PIP_IMPORTS: &str = "import pip._internal.cli.main, pip._internal.commands.install, \
    pip._vendor.rich.console, pip._vendor.requests";

/// A venv with pip (700 sources), and copies of it as further prefixes.
fn venvs(t: &TestDir, n: usize) -> Vec<PathBuf> {
    let first = t.join("venv0");
    make_venv(&python("3.11"), &first);
    let mut all = vec![first.clone()];
    for i in 1..n {
        let dest = t.join(format!("venv{i}"));
        copy_tree(&first, &dest);
        all.push(dest);
    }
    all
}

fn copy_tree(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn finish(name: &str, child: Child) -> std::process::Output {
    let out = child.wait_with_output().unwrap();
    assert_output!(out, out.status.success(), "{name} failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("lock held") && !stderr.contains("Resource temporarily unavailable"),
        "{name}: {stderr}"
    );
    out
}

/// Checks that every pyc under the roots is whole: a Python process loads
/// each one's code with marshal. Returns how many it checked.
fn assert_pycs_whole(roots: &[PathBuf]) -> usize {
    let script = r#"
import marshal, os, sys
n = 0
for root in sys.argv[1:]:
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith('.pyc'):
                continue
            p = os.path.join(d, f)
            with open(p, 'rb') as fh:
                data = fh.read()
            try:
                marshal.loads(data[16:])
            except Exception as e:
                print('PARTIAL', p, len(data), e)
                sys.exit(1)
            n += 1
print(n)
"#;
    let out = run(Command::new(python("3.11"))
        .args(["-I", "-c", script])
        .args(roots));
    assert_output!(out, out.status.success(), "a partial pyc is visible");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A thread checking every pyc under some prefixes over and over until
/// stopped; dropped during a failing test, it stops before the test's
/// directory goes away.
struct Watcher {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Watcher {
    fn start(roots: Vec<PathBuf>) -> Watcher {
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut checks = 0;
                while !done.load(Ordering::Relaxed) {
                    assert_pycs_whole(&roots);
                    checks += 1;
                }
                checks
            })
        };
        Watcher {
            done,
            thread: Some(thread),
        }
    }

    /// How many times all pycs were checked; panics if one was partial.
    fn stop(mut self) -> usize {
        self.done.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("stopped once");
        thread.join().expect("no partial pyc was seen")
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn eight_links_a_gc_and_a_verify_on_one_store_all_succeed() {
    let t = TestDir::new();
    let prefixes = venvs(&t, 7);
    for round in 0..2 {
        if round > 0 {
            for p in &prefixes {
                remove_pycache(p);
            }
        }
        // Seven prefixes, one of them twice: eight processes.
        let mut children: Vec<(String, Child)> = prefixes
            .iter()
            .chain(std::iter::once(&prefixes[0]))
            .enumerate()
            .map(|(i, p)| {
                (
                    format!("link #{i} of {}", p.display()),
                    spawn(t.pycstore().arg("link").arg("-q").arg(p)),
                )
            })
            .collect();
        children.push(("stats".into(), spawn(t.pycstore().arg("stats"))));
        children.push((
            "gc".into(),
            spawn(t.pycstore().args(["gc", "--max-size", "4M"])),
        ));
        children.push(("verify".into(), spawn(t.pycstore().arg("verify"))));
        children.push((
            "status".into(),
            spawn(t.pycstore().arg("status").arg(&prefixes[1])),
        ));
        // Watch the prefixes while they are being linked.
        let watcher = Watcher::start(prefixes.clone());
        for (name, child) in children {
            // In the first round the links are making the store: a command
            // that only reads it may start before it exists, and then says
            // so (it never makes one) and fails, nothing else.
            if round == 0 && !name.starts_with("link") {
                let out = child.wait_with_output().unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                let no_store_yet =
                    out.status.code() == Some(2) && stderr.contains("there is no store at");
                assert_output!(out, out.status.success() || no_store_yet, "{name} failed");
                assert!(!stderr.contains("lock held"), "{name}: {stderr}");
                continue;
            }
            finish(&name, child);
        }
        assert!(watcher.stop() > 0);
        for p in &prefixes {
            let log = python_v(&p.join("bin/python"), &["-c", PIP_IMPORTS], &[]);
            assert_nothing_compiled(&log, p, 100);
        }
        assert!(assert_pycs_whole(&prefixes) >= 7 * 700);
    }
}

/// A long cold compile holds no lock that another process's hits need.
#[test]
fn a_cold_compile_does_not_block_hits() {
    let t = TestDir::new();
    let prefixes = venvs(&t, 2);
    let python = python("3.11");
    // Warm the store with the first venv; the cold run gets new sources.
    run_ok(t.pycstore().arg("link").arg("-q").arg(&prefixes[0]));
    let warm = &prefixes[1];
    let cold_dir = t.join("cold");
    for i in 0..600 {
        t.write(
            format!("cold/m{i}.py"),
            format!("def f{i}(x):\n    return [x * {i} for _ in range(10)]\n").repeat(40),
        );
    }
    let mut cold = spawn(
        t.pycstore()
            .args(["link", "-q", "-j", "1", "--python"])
            .arg(&python)
            .arg(&cold_dir),
    );
    // Let the cold run get past its walk, into compiling.
    let started = Instant::now();
    while pycs_under(&cold_dir).len() < 20 {
        assert!(
            cold.try_wait().unwrap().is_none(),
            "the cold run ended before it was measured"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cold run placed nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_ok(t.pycstore().arg("link").arg("--json").arg(warm));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["compiled"], 0, "{json}");
    assert!(
        cold.try_wait().unwrap().is_none(),
        "the warm link finished only after the cold one: it was blocked"
    );
    let out = cold.wait_with_output().unwrap();
    assert_output!(out, out.status.success(), "the cold link failed");
    assert_eq!(pycs_under(&cold_dir).len(), 600);
}
