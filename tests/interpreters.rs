//! Every supported interpreter imports a real package (pip, installed into a
//! real venv) from pycs that pycstore placed, with nothing recompiled.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// Modules of pip that pull in a few hundred files, vendored packages included.
const PIP_IMPORTS: &str = "import pip._internal.cli.main, pip._internal.commands.install, \
    pip._vendor.packaging.version, pip._vendor.rich.console, pip._vendor.requests";

fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// Link a fresh venv, import pip with `-v`: everything comes from pycs.
fn links_a_real_venv(version: &str) {
    let t = TestDir::new();
    let venv = t.join("venv");
    make_venv(&python(version), &venv);
    assert!(pycs_under(&venv).is_empty());

    let (out, json) = link_json(t.pycstore().arg("link").arg(&venv));
    assert_output!(out, out.status.success(), "link failed");
    assert!(json["compiled"].as_u64().unwrap() > 300, "{json}");
    assert_eq!(json["failed"], 0, "{json}");

    let log = python_v(&venv_python(&venv), &["-c", PIP_IMPORTS], &[]);
    assert_nothing_compiled(&log, &venv, 100);

    // A second venv with the same packages is all hits.
    let second = t.join("second");
    make_venv(&python(version), &second);
    let (out, json) = link_json(t.pycstore().arg("link").arg(&second));
    assert_output!(out, out.status.success(), "second link failed");
    assert_eq!(json["compiled"], 0, "{json}");
    assert!(json["hits"].as_u64().unwrap() > 300, "{json}");
    let log = python_v(&venv_python(&second), &["-c", PIP_IMPORTS], &[]);
    assert_nothing_compiled(&log, &second, 100);

    // Linking again changes nothing.
    let (_, json) = link_json(t.pycstore().arg("link").arg(&second));
    assert_eq!(json["up_to_date"], json["pycs"], "{json}");
}

#[test]
fn cpython_3_8() {
    links_a_real_venv("3.8");
}

#[test]
fn cpython_3_10() {
    links_a_real_venv("3.10");
}

#[test]
fn cpython_3_11() {
    links_a_real_venv("3.11");
}

#[test]
fn cpython_3_12() {
    links_a_real_venv("3.12");
}

#[test]
fn cpython_3_13() {
    links_a_real_venv("3.13");
}

#[test]
fn pypy_3_9() {
    links_a_real_venv("pypy3.9");
}

/// The source hash pycstore writes is the one the live interpreter computes.
#[test]
fn source_hashes_match_live_interpreters() {
    for version in ["3.8", "3.10", "3.11", "3.12", "3.13", "pypy3.9"] {
        let t = TestDir::new();
        let python = python(version);
        let src = t.write("app/mod.py", "# -*- coding: latin-1 -*-\nx = 'caf\u{e9}'\n");
        t.write("app/empty.py", "");
        run_ok(
            t.pycstore()
                .arg("link")
                .arg("--python")
                .arg(&python)
                .arg(t.join("app")),
        );
        let script = "import sys, glob, importlib.util\n\
                      for pyc in sorted(glob.glob(sys.argv[1] + '/__pycache__/*.pyc')):\n\
                      \x20   src = sys.argv[1] + '/' + pyc.rsplit('/', 1)[1].split('.')[0] + '.py'\n\
                      \x20   with open(pyc, 'rb') as f: header = f.read(16)\n\
                      \x20   want = importlib.util.source_hash(open(src, 'rb').read())\n\
                      \x20   assert header[:4] == importlib.util.MAGIC_NUMBER, pyc\n\
                      \x20   assert header[8:16] == want, (pyc, header[8:16], want)\n\
                      \x20   print(pyc)\n";
        let out = run_ok(
            Command::new(&python)
                .args(["-I", "-c", script])
                .arg(t.join("app")),
        );
        let checked = String::from_utf8_lossy(&out.stdout).lines().count();
        assert_eq!(
            checked,
            2,
            "{version}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(src.exists());
    }
}

/// A pyc compiled at one path serves another: tracebacks name the path the
/// module was imported from. A source edited after linking is recompiled by
/// Python and the store's object is untouched.
#[test]
fn tracebacks_name_the_destination_and_edits_recompile() {
    for version in ["3.11", "3.13", "pypy3.9"] {
        let t = TestDir::new();
        let python = python(version);
        let module = "def boom():\n    raise ValueError('boom')\n";
        t.write("first/pkg/__init__.py", "");
        t.write("first/pkg/crash.py", module);
        t.write("second/pkg/__init__.py", "");
        let crash = t.write("second/pkg/crash.py", module);
        for prefix in ["first", "second"] {
            run_ok(
                t.pycstore()
                    .args(["link", "--link-mode", "hardlink", "--python"])
                    .arg(&python)
                    .arg(t.join(prefix)),
            );
        }
        let second = t.join("second");
        let pythonpath = [("PYTHONPATH", second.as_os_str())];
        let log = python_v(
            &python,
            &["-c", "import pkg.crash; pkg.crash.boom()"],
            &pythonpath,
        );
        let stderr = String::from_utf8_lossy(&log.output.stderr);
        assert!(
            stderr.contains(&format!("File \"{}\"", crash.display())),
            "{version}: the traceback does not name {}:\n{stderr}",
            crash.display()
        );
        assert!(
            !stderr.contains("first/pkg"),
            "{version}: traceback names the first prefix:\n{stderr}"
        );
        assert!(
            log.from_source
                .iter()
                .all(|p| !p.starts_with(second.to_str().unwrap())),
            "{log:?}"
        );
        assert!(
            log.from_pyc.iter().any(|p| p.contains("crash")),
            "{version}: {:?}",
            log.from_pyc
        );

        // Edit the source: Python notices (checked-hash), recompiles, rewrites
        // the pyc by rename; the store object it was linked to is unchanged.
        let pyc = pycs_under(&second)
            .into_iter()
            .find(|p| p.to_str().unwrap().contains("crash."))
            .map(|p| second.join(p))
            .unwrap();
        let before = std::fs::read(&pyc).unwrap();
        let ino = std::fs::metadata(&pyc).unwrap().ino();
        let object =
            find_object_by_inode(&t.store(), ino).expect("the pyc is a hardlink to a store object");
        std::fs::write(&crash, "def boom():\n    return 'edited'\n").unwrap();
        let log = python_v(
            &python,
            &["-c", "import pkg.crash; print(pkg.crash.boom())"],
            &pythonpath,
        );
        assert!(String::from_utf8_lossy(&log.output.stdout).contains("edited"));
        assert!(
            log.from_source.iter().any(|p| p.ends_with("crash.py")),
            "{version}: the edited source was not recompiled: {log:?}"
        );
        assert_eq!(
            std::fs::read(&object).unwrap(),
            before,
            "{version}: the store object changed"
        );
        assert_ne!(
            std::fs::read(&pyc).unwrap(),
            before,
            "{version}: Python did not rewrite the pyc"
        );
    }
}

fn find_object_by_inode(store: &Path, ino: u64) -> Option<PathBuf> {
    walkdir::WalkDir::new(store.join("objects-v1"))
        .into_iter()
        .flatten()
        .find(|e| e.file_type().is_file() && e.metadata().map(|m| m.ino()).ok() == Some(ino))
        .map(|e| e.into_path())
}
