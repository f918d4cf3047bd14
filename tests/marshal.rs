//! The pyc body checker (`pycstore_store::marshal::check_pyc`) against real
//! pycs: every module of the standard library of every interpreter compiled
//! by that interpreter passes; truncated pycs fail; flipped bytes never
//! panic, and what the checker passes, the interpreter loads.

use std::path::{Path, PathBuf};
use std::process::Command;

use pycstore_store::marshal::{check_pyc, BodyError};

use crate::util::*;

/// Every interpreter whose pyc format the checker knows, with the name it
/// reports for it.
const INTERPRETERS: &[(&str, &str)] = &[
    ("3.6", "CPython 3.6"),
    ("3.7", "CPython 3.7"),
    ("3.8", "CPython 3.8"),
    ("3.9", "CPython 3.9"),
    ("3.10", "CPython 3.10"),
    ("3.11", "CPython 3.11"),
    ("3.12", "CPython 3.12"),
    ("3.13", "CPython 3.13"),
    ("pypy3.9", "PyPy 3.9"),
];

/// Compiles every module of the interpreter's standard library (outside
/// site-packages) into `out`, two processes at a time; prints how many.
const COMPILE_STDLIB: &str = r#"
import os, sys, sysconfig, py_compile
import concurrent.futures as cf
out = sys.argv[1]
lib = sysconfig.get_paths()['stdlib']
def job(src):
    dst = os.path.join(out, os.path.relpath(src, lib) + 'c')
    try:
        py_compile.compile(src, cfile=dst, doraise=True)
        return 1
    except Exception:
        return 0
files = []
for d, dirs, fs in os.walk(lib):
    dirs[:] = sorted(x for x in dirs
                     if x not in ('site-packages', 'dist-packages', '__pycache__'))
    files += [os.path.join(d, f) for f in sorted(fs) if f.endswith('.py')]
with cf.ProcessPoolExecutor(2) as ex:
    print(sum(ex.map(job, files, chunksize=64)))
"#;

/// A module with a constant of every kind marshal writes.
const VARIED: &str = r#"
"""A docstring with unicode: \u00e9\u4e2d\U0001f600 and a surrogate escape."""
import sys
SMALL, NEGATIVE, BIG, HUGE = 7, -3, 2**40, -(3**200)
FLOATS = (1.5, -0.0, float('inf'), 1e300)
COMPLEX = (1+2j, -3.5j)
BYTES, TEXT = b"\x00\xff bytes", "text \u00e9"
FROZEN = frozenset({1, 'a', (2, 3)})
NESTED = ((1, (2, (3, (4, ('deep',))))), None, True, False, ...)
def f(a, b=2, *args, c, d=4, **kw):
    x = [a, b, {c: d}, {1, 2}]
    def g(y):
        nonlocal x
        return lambda z: (x, y, z, a)
    return g
class C:
    attr: int = 3
    def method(self, p, *, q):
        try:
            return f"{p!r:>10} {q}"
        except (ValueError, TypeError) as e:
            raise RuntimeError(e) from None
        finally:
            pass
"#;

/// Reads pycs given as `len u32 LE ‖ bytes` in a file, from the one at
/// an index on; prints one line per pyc as it goes: 1 when `marshal.loads`
/// gives a code object, else 0 and why. (Some damage kills the interpreter
/// itself: "Fatal Python error: non-string found in code slot".)
const LOADS: &str = r#"
import marshal, struct, sys, types
data = open(sys.argv[1], 'rb').read()
hlen, start = int(sys.argv[2]), int(sys.argv[3])
i = k = 0
while i < len(data):
    (n,) = struct.unpack_from('<I', data, i)
    pyc = data[i + 4:i + 4 + n]
    i += 4 + n
    k += 1
    if k <= start:
        continue
    try:
        code = marshal.loads(pyc[hlen:])
        why = '' if isinstance(code, types.CodeType) else type(code).__name__
    except Exception as e:
        why = repr(e).replace('\n', ' ') or '?'
    sys.stdout.write('1\n' if not why else '0 %s\n' % why)
    sys.stdout.flush()
"#;

fn compile_stdlib(python: &Path, out: &Path) -> usize {
    let output = run_ok(
        Command::new(python)
            .args(["-c", COMPILE_STDLIB])
            .arg(out)
            .env_remove("PYTHONDONTWRITEBYTECODE")
            .env_remove("SOURCE_DATE_EPOCH")
            .env_remove("PYTHONPYCACHEPREFIX"),
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

fn pycs(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.path().extension() == Some("pyc".as_ref()))
        .map(|e| e.into_path())
        .collect();
    v.sort();
    v
}

#[test]
fn every_stdlib_module_of_every_interpreter_passes() {
    let t = TestDir::new();
    let mut report = Vec::new();
    for (version, name) in INTERPRETERS {
        let out = t.join(version);
        let compiled = compile_stdlib(&python(version), &out);
        let found = pycs(&out);
        assert_eq!(found.len(), compiled, "{version}: pycs written");
        assert!(compiled > 900, "{version}: only {compiled} stdlib modules");
        let mut bytes_checked = 0;
        for pyc in &found {
            let bytes = std::fs::read(pyc).unwrap();
            match check_pyc(&bytes) {
                Ok(format) => assert_eq!(format.python(), *name, "{}", pyc.display()),
                Err(e) => panic!("{version}: {}: {e}", pyc.display()),
            }
            bytes_checked += bytes.len();
        }
        report.push(format!("{version}: {compiled} pycs, {bytes_checked} bytes"));
    }
    eprintln!("{}", report.join("\n"));
}

/// Compiles [`VARIED`] with `python`; returns the pyc.
fn varied_pyc(t: &TestDir, version: &str) -> Vec<u8> {
    let src = t.write(format!("{version}/varied.py"), VARIED);
    let pyc = t.join(format!("{version}/varied.pyc"));
    run_ok(
        Command::new(python(version))
            .args([
                "-c",
                // The same bytes on every run: co_filename does not name
                // the temp dir.
                "import py_compile, sys; \
                 py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile='varied.py', doraise=True)",
            ])
            .arg(&src)
            .arg(&pyc)
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );
    std::fs::read(pyc).unwrap()
}

/// What `marshal.loads` did with a pyc's body.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Loads {
    Code,
    /// Raised an exception, or gave something else than a code object.
    Rejected(String),
    /// Killed the interpreter: damage inside `co_code` (opcodes 3.13
    /// trusts), or a "Fatal Python error" of 3.7. Beyond marshal's
    /// structure.
    Crashed,
}

/// What `python` does with each pyc's body.
fn python_loads(t: &TestDir, version: &str, header_len: usize, pycs: &[Vec<u8>]) -> Vec<Loads> {
    let mut input = Vec::new();
    for pyc in pycs {
        input.extend_from_slice(&(pyc.len() as u32).to_le_bytes());
        input.extend_from_slice(pyc);
    }
    let file = t.write(format!("{version}/variants"), input);
    let mut verdicts: Vec<Loads> = Vec::new();
    while verdicts.len() < pycs.len() {
        // A flipped size can make marshal allocate gigabytes: fail fast.
        let output = run(Command::new("prlimit")
            .arg("--as=2147483648")
            .arg(python(version))
            .args(["-I", "-c", LOADS])
            .arg(&file)
            .arg(header_len.to_string())
            .arg(verdicts.len().to_string()));
        verdicts.extend(String::from_utf8_lossy(&output.stdout).lines().map(|l| {
            if l == "1" {
                Loads::Code
            } else {
                Loads::Rejected(l[1..].trim().to_string())
            }
        }));
        if !output.status.success() {
            // The next one killed it.
            verdicts.push(Loads::Crashed);
        }
    }
    assert_eq!(verdicts.len(), pycs.len());
    verdicts
}

#[test]
fn truncated_and_garbage_bodies_fail_and_flips_never_pass_what_python_rejects() {
    let t = TestDir::new();
    for version in ["3.7", "3.9", "3.11", "3.13", "pypy3.9"] {
        let good = varied_pyc(&t, version);
        let format = check_pyc(&good).unwrap_or_else(|e| panic!("{version}: {e}"));
        let header = format.header_len();

        // Every truncation is damage.
        for cut in 0..good.len() {
            match check_pyc(&good[..cut]) {
                Err(e) if e.is_damage() => {}
                other => panic!("{version}: cut at {cut}: {other:?}"),
            }
        }
        // The case from the field: a valid header, the code type byte,
        // garbage.
        let mut garbage = good[..header].to_vec();
        garbage.extend_from_slice(b"c\x00\x00\x00\x00garbage that is not a code object at all");
        assert!(matches!(
            check_pyc(&garbage),
            Err(BodyError::Damaged { .. })
        ));

        // Flips: never a panic, and never a pass for what Python rejects.
        // (A flip inside `co_code` may pass and still crash the
        // interpreter: opcodes are beyond marshal's structure.)
        // 2,000 flips at places and of bits drawn from a fixed sequence.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        let mut flips = Vec::new();
        let mut variants = Vec::new();
        for _ in 0..2000 {
            let at = header + next() % (good.len() - header);
            let mask = (next() % 255 + 1) as u8;
            let mut flipped = good.clone();
            flipped[at] ^= mask;
            flips.push((at, mask));
            variants.push(flipped);
        }
        let ours: Vec<bool> = variants.iter().map(|v| check_pyc(v).is_ok()).collect();
        let loads = python_loads(&t, version, header, &variants);
        let wrongly_passed: Vec<usize> = (0..variants.len())
            .filter(|&i| ours[i] && matches!(loads[i], Loads::Rejected(_)))
            .collect();
        let rejected = ours.iter().filter(|ok| !**ok).count();
        let rejects = loads
            .iter()
            .filter(|l| matches!(l, Loads::Rejected(_)))
            .count();
        let crashes = loads.iter().filter(|l| **l == Loads::Crashed).count();
        eprintln!(
            "{version}: {} flips: the checker rejects {rejected}; {version} rejects {}, crashes on {}",
            variants.len(),
            rejects,
            crashes,
        );
        assert!(
            wrongly_passed.is_empty(),
            "{version}: {} flips pass the checker but do not load: (byte, mask) {:?}",
            wrongly_passed.len(),
            wrongly_passed
                .iter()
                .map(|&i| (flips[i], &loads[i]))
                .collect::<Vec<_>>()
        );
        assert!(rejected > 0);
    }
}
