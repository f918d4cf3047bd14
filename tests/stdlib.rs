//! The CPython 3.11 standard library, linked by pycstore and compiled by
//! `python -m compileall`: the same pycs come out, and the same files fail.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// Copies the standard library at `from` to `to`, without `site-packages`,
/// without any `__pycache__`, and without symlinks.
fn copy_stdlib(from: &Path, to: &Path) {
    let walker = walkdir::WalkDir::new(from)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| {
            !(e.file_type().is_dir()
                && (e.file_name() == "__pycache__"
                    || (e.depth() == 1 && e.file_name() == "site-packages")))
        });
    for entry in walker {
        let entry = entry.unwrap();
        let dest = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else if entry.file_type().is_file() {
            std::fs::copy(entry.path(), &dest)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// Every `.py` source below `root` the way compileall finds them (no
/// `__pycache__`), relative to `root`.
fn sources_under(root: &Path) -> BTreeSet<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_entry(|e| !(e.file_type().is_dir() && e.file_name() == "__pycache__"))
        .map(|e| e.unwrap())
        .filter(|e| {
            e.file_type().is_file()
                && e.path().extension() == Some(OsStr::new("py"))
                && e.file_name() != ".py"
        })
        .map(|e| e.path().strip_prefix(root).unwrap().to_path_buf())
        .collect()
}

/// The optimize-0 CPython 3.11 pyc of a relative source path.
fn pyc_of(source: &Path) -> PathBuf {
    let stem = source.file_stem().unwrap().to_str().unwrap();
    source
        .parent()
        .unwrap()
        .join("__pycache__")
        .join(format!("{stem}.cpython-311.pyc"))
}

/// Describes two sets that should be equal: what only each side holds.
fn difference(
    what: &str,
    left_name: &str,
    left: &BTreeSet<PathBuf>,
    right_name: &str,
    right: &BTreeSet<PathBuf>,
) -> Option<String> {
    if left == right {
        return None;
    }
    let mut s = format!("{what} differ\n");
    for (name, a, b) in [(left_name, left, right), (right_name, right, left)] {
        let only: Vec<_> = a.difference(b).collect();
        writeln!(s, "  only in {name} ({}):", only.len()).unwrap();
        for p in only {
            writeln!(s, "    {}", p.display()).unwrap();
        }
    }
    Some(s)
}

#[test]
fn stdlib_links_like_compileall() {
    let py = python("3.11");
    let lib = py
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("lib/python3.11");
    assert!(
        lib.join("os.py").is_file(),
        "no stdlib at {}",
        lib.display()
    );

    let t = TestDir::new();
    let a = t.join("A");
    let b = t.join("B");
    copy_stdlib(&lib, &a);
    copy_stdlib(&lib, &b);
    let sources = sources_under(&a);
    assert!(
        sources.len() > 1000,
        "only {} sources copied",
        sources.len()
    );
    assert_eq!(sources, sources_under(&b));

    // compileall fails on the deliberately broken files of the test suites,
    // so its exit status is not checked; what it wrote is.
    let compileall = run(Command::new(&py)
        .args(["-m", "compileall", "-q", "-j0"])
        .arg(&a)
        .env_remove("PYTHONDONTWRITEBYTECODE")
        .env_remove("PYTHONPYCACHEPREFIX")
        .env_remove("SOURCE_DATE_EPOCH"));
    assert_output!(
        compileall,
        compileall.status.code().is_some(),
        "compileall did not exit normally"
    );

    let (out, json) = link_json(
        pycstore(&t.store())
            .arg("link")
            .arg("--python")
            .arg(&py)
            .args(["-j", "2"])
            .arg(&b),
    );
    let failures = json["failures"].as_array().unwrap_or_else(|| {
        panic!("no failures list in {json:#}");
    });
    assert_output!(
        out,
        out.status.code() == Some(1)
            && json["sources"].as_u64() == Some(sources.len() as u64)
            && json["failed"].as_u64() == Some(failures.len() as u64),
        "expected exit code 1 (some stdlib files do not compile), {} sources and one \
         failure per failed pyc: {}",
        sources.len(),
        serde_json::to_string(&serde_json::json!({
            "sources": json["sources"],
            "failed": json["failed"],
            "compiled": json["compiled"],
            "failures": failures.len(),
        }))
        .unwrap()
    );

    let pycs_a: BTreeSet<PathBuf> = pycs_under(&a).into_iter().collect();
    let pycs_b: BTreeSet<PathBuf> = pycs_under(&b).into_iter().collect();
    let failed_a: BTreeSet<PathBuf> = sources
        .iter()
        .filter(|s| !a.join(pyc_of(s)).exists())
        .cloned()
        .collect();
    let failed_b: BTreeSet<PathBuf> = failures
        .iter()
        .map(|f| {
            let path = Path::new(f["path"].as_str().unwrap());
            path.strip_prefix(&b)
                .unwrap_or_else(|_| panic!("failure outside the prefix: {f}"))
                .to_path_buf()
        })
        .collect();

    let problems: Vec<String> = [
        difference("pycs", "compileall", &pycs_a, "pycstore", &pycs_b),
        difference(
            "sources without a pyc",
            "compileall",
            &failed_a,
            "pycstore's failures",
            &failed_b,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        problems.is_empty(),
        "{}\n--- compileall stdout:\n{}\n--- pycstore failures:\n{}",
        problems.join("\n"),
        String::from_utf8_lossy(&compileall.stdout),
        serde_json::to_string_pretty(failures).unwrap()
    );

    assert!(!failed_a.is_empty(), "no stdlib file failed to compile");
    for dir in ["lib2to3/tests/data/", "test/"] {
        assert!(
            failed_a.iter().any(|p| p.starts_with(dir)),
            "no failure under {dir}: {failed_a:#?}"
        );
    }
    // Every source either has its pyc or failed.
    assert_eq!(pycs_b.len() + failed_b.len(), sources.len());
}
