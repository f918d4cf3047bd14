//! `kill -9` at random moments of cold and warm links and of gc: after each,
//! `verify` passes, no partial or wrong pyc is in the prefix, and the next
//! link completes with the prefix importing nothing from source.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// Every pyc under `root` is whole and valid for the source beside it
/// (checked-hash: the header carries the hash of the current source).
fn assert_pycs_valid(root: &Path) {
    let script = r#"
import importlib.util, marshal, os, sys
for d, _, files in os.walk(sys.argv[1]):
    if os.path.basename(d) != '__pycache__':
        continue
    for f in files:
        if not f.endswith('.pyc'):
            continue
        p = os.path.join(d, f)
        src = os.path.join(os.path.dirname(d), f.split('.')[0] + '.py')
        data = open(p, 'rb').read()
        assert data[:4] == importlib.util.MAGIC_NUMBER, p
        assert data[8:16] == importlib.util.source_hash(open(src, 'rb').read()), ('wrong pyc', p)
        marshal.loads(data[16:])
"#;
    let out = run(Command::new(python("3.11"))
        .args(["-I", "-c", script])
        .arg(root));
    assert_output!(
        out,
        out.status.success(),
        "a partial or wrong pyc in {}",
        root.display()
    );
}

/// A small, repeatable pseudo-random sequence (no need for more).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// New sources every round, so each cold link really compiles.
fn write_cold_sources(root: &Path, round: usize) {
    for i in 0..120 {
        let path = root.join(format!("pkg{}/m{i}.py", i % 6));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body =
            format!("ROUND = {round}\n\ndef f{i}(x):\n    return [x + {i} for _ in range(3)]\n")
                .repeat(30);
        std::fs::write(path, body).unwrap();
    }
}

#[test]
fn killed_at_random_moments_loses_only_work_in_flight() {
    let t = TestDir::new();
    let python = python("3.11");
    let template = t.join("template");
    make_venv(&python, &template);
    run_ok(t.pycstore().arg("link").arg("-q").arg(&template));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash test seed {seed}");
    let mut rng = Lcg(seed);
    let rounds = 51;
    for round in 0..rounds {
        let kind = ["cold", "warm", "gc"][round % 3];
        let prefix: PathBuf = match kind {
            "cold" => {
                let p = t.join(format!("cold{round}"));
                write_cold_sources(&p, round);
                p
            }
            _ => {
                let p = t.join(format!("warm{round}"));
                run_ok(Command::new("cp").arg("-a").arg(&template).arg(&p));
                remove_pycache(&p);
                p
            }
        };
        let mut cmd = t.pycstore();
        match kind {
            "cold" => cmd
                .args(["link", "-q", "--python"])
                .arg(&python)
                .arg(&prefix),
            "warm" => cmd.args(["link", "-q"]).arg(&prefix),
            _ => cmd.args(["gc", "--max-size", "2M"]),
        };
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = Duration::from_millis(rng.below(if kind == "cold" { 1500 } else { 400 }));
        let started = Instant::now();
        while started.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();

        let out = run(t.pycstore().args(["verify", "--json"]));
        assert_output!(
            out,
            out.status.success(),
            "round {round} ({kind}, killed after {delay:?}): verify"
        );
        if kind == "gc" {
            continue;
        }
        assert_pycs_valid(&prefix);
        let mut again = t.pycstore();
        if kind == "cold" {
            again.args(["link", "--python"]).arg(&python).arg(&prefix);
        } else {
            again.arg("link").arg(&prefix);
        }
        let (out, json) = link_json(&mut again);
        assert_output!(
            out,
            out.status.success(),
            "round {round} ({kind}): the next link: {json}"
        );
        assert_pycs_valid(&prefix);
        if kind == "cold" {
            let script = "import importlib\nfor i in range(120): importlib.import_module('pkg%d.m%d' % (i % 6, i))";
            let log = python_v(
                &python,
                &["-c", script],
                &[("PYTHONPATH", prefix.as_os_str())],
            );
            assert_nothing_compiled(&log, &prefix, 120);
        } else {
            let log = python_v(
                &prefix.join("bin/python"),
                &["-c", "import pip._internal.cli.main"],
                &[],
            );
            assert_nothing_compiled(&log, &prefix, 50);
            std::fs::remove_dir_all(&prefix).unwrap();
        }
    }
}
