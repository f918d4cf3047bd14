//! `export` and `import`: a pack made on one store lets another link without
//! compiling; a damaged pack is refused and changes nothing; `--python` and
//! `--prefix` choose what goes in.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::util::*;

/// Runs a `--json` command that must succeed and returns its summary.
fn json_ok(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON from {cmd:?}: {e}\n--- stdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `pycstore --store STORE link --python PYTHON PREFIX --json`, which must
/// succeed.
fn link(store: &Path, python: &Path, prefix: &Path, extra: &[&str]) -> serde_json::Value {
    let (out, json) = link_json(
        pycstore(store)
            .arg("link")
            .args(extra)
            .arg("--python")
            .arg(python)
            .arg(prefix),
    );
    assert_output!(out, out.status.success(), "link failed: {json}");
    json
}

/// Every file under `root` with its mode and bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let meta = e.metadata().unwrap();
            (
                e.path().strip_prefix(root).unwrap().to_path_buf(),
                (meta.permissions().mode(), std::fs::read(e.path()).unwrap()),
            )
        })
        .collect()
}

/// A directory of `n` small modules whose sources differ by `tag`.
fn write_app(t: &TestDir, dir: &str, tag: &str, n: usize) -> PathBuf {
    for i in 0..n {
        t.write(
            format!("{dir}/mod_{i}.py"),
            format!("# {tag}\nVALUE = {i}\n\ndef f(x):\n    return x * {i} + len({tag:?})\n"),
        );
    }
    t.join(dir)
}

#[test]
fn an_imported_pack_links_a_venv_without_compiling() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let venv_a = t.join("venv-a");
    make_venv(&python, &venv_a);
    let linked = link(&store_a, &python, &venv_a, &[]);
    let pycs = linked["pycs"].as_u64().unwrap();
    assert!(pycs > 300, "{linked}");
    assert_eq!(linked["compiled"], pycs, "{linked}");

    let pack = t.join("pycs.pack");
    let exported = json_ok(pycstore(&store_a).arg("export").arg(&pack));
    // A checked-hash entry and a body entry per distinct source (the many
    // empty `__init__.py` are one).
    let entries = exported["entries"].as_u64().unwrap();
    assert!(
        entries.is_multiple_of(2) && entries > pycs && entries <= 2 * pycs,
        "{exported}"
    );
    assert_eq!(exported["skipped_entries"], 0, "{exported}");
    let objects = exported["objects"].as_u64().unwrap();
    assert!(objects > 0 && objects <= pycs, "{exported}");
    assert_eq!(
        exported["pack_bytes"],
        std::fs::metadata(&pack).unwrap().len(),
        "{exported}"
    );

    let imported = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(imported["entries_added"], entries, "{imported}");
    assert_eq!(imported["objects_added"], objects, "{imported}");
    assert_eq!(imported["objects_present"], 0, "{imported}");
    assert!(std::fs::read_dir(store_b.join("tmp"))
        .unwrap()
        .next()
        .is_none());

    // A new venv, a store that never compiled anything: all hits.
    let venv_b = t.join("venv-b");
    make_venv(&python, &venv_b);
    let linked = link(&store_b, &venv_b.join("bin/python"), &venv_b, &[]);
    assert_eq!(linked["compiled"], 0, "{linked}");
    assert_eq!(linked["hits"], pycs, "{linked}");
    let imports = "import pip._internal.cli.main, pip._internal.commands.install, \
                   pip._vendor.rich.console, pip._vendor.requests";
    let log = python_v(&venv_b.join("bin/python"), &["-c", imports], &[]);
    assert_nothing_compiled(&log, &venv_b, 100);

    // Importing again adds nothing.
    let again = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(again["entries_added"], 0, "{again}");
    assert_eq!(again["objects_added"], 0, "{again}");

    // Humans get one line.
    let out = run_ok(pycstore(&store_b).arg("import").arg(&pack));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!("imported 0 new entries (of {entries})")),
        "{stdout}"
    );
}

#[test]
fn a_damaged_pack_is_rejected_and_changes_nothing() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "exported", 40);
    link(&store_a, &python, &app, &[]);
    let pack = t.join("pycs.pack");
    run_ok(pycstore(&store_a).arg("export").arg(&pack));
    let bytes = std::fs::read(&pack).unwrap();
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());

    // Store B holds something of its own.
    let own = write_app(&t, "own", "store b's own", 3);
    link(&store_b, &python, &own, &[]);
    let before = snapshot(&store_b);

    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        (
            "short by one byte",
            bytes[..bytes.len() - 1].to_vec(),
            "truncated",
        ),
        ("flipped", flipped, "damaged"),
        (
            "garbage",
            b"GIF89a not a pack at all".repeat(40),
            "not a pycstore pack",
        ),
        ("empty", Vec::new(), "empty"),
    ];
    for (name, damaged, says) in cases {
        let path = t.write(format!("{name}.pack"), &damaged);
        let out = run(pycstore(&store_b).arg("import").arg(&path));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_output!(
            out,
            out.status.code() == Some(2)
                && stderr.contains(&format!("rejected the pack `{}`", path.display()))
                && stderr.contains(says)
                && stderr.contains("nothing was imported")
                && stderr.lines().count() == 1,
            "{name}: expected exit 2 and one line saying {says:?}"
        );
        assert!(
            snapshot(&store_b) == before,
            "{name}: importing a damaged pack changed the store"
        );
    }

    // The store still works, and the intact pack still imports.
    let imported = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(imported["entries_added"], 80, "{imported}");
    let copy = write_app(&t, "app-copy", "exported", 40);
    assert_eq!(link(&store_b, &python, &copy, &[])["compiled"], 0);
}

#[test]
fn python_selects_one_interpreters_entries() {
    let (py311, py312) = (python("3.11"), python("3.12"));
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "both", 5);
    run_ok(
        pycstore(&store_a)
            .args(["link", "--python"])
            .arg(&py311)
            .arg("--python")
            .arg(&py312)
            .arg(&app),
    );

    let pack = t.join("312.pack");
    let exported = json_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(&pack)
            .arg("--python")
            .arg(&py312),
    );
    assert_eq!(exported["entries"], 10, "{exported}");
    assert_eq!(exported["objects"], 5, "{exported}");
    run_ok(pycstore(&store_b).arg("import").arg(&pack));

    let copy = write_app(&t, "copy", "both", 5);
    assert_eq!(link(&store_b, &py311, &copy, &[])["compiled"], 5);
    let linked = link(&store_b, &py312, &copy, &[]);
    assert_eq!(linked["compiled"], 0, "{linked}");
    assert_eq!(linked["hits"], 5, "{linked}");

    // An interpreter the store has nothing for: an empty pack, and a warning.
    let out = run_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(t.join("310.pack"))
            .arg("--python")
            .arg(python("3.10")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds no pycs for"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("exported 0 entries"),
        "{out:?}"
    );
}

#[test]
fn an_object_gone_from_the_store_leaves_its_entries_out() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "evicted", 3);
    link(&store_a, &python, &app, &[]);
    // As if gc evicted one object after the index was read.
    let pyc = app.join("__pycache__/mod_0.cpython-311.pyc");
    let gone = std::fs::read(&pyc).unwrap();
    let object = walkdir::WalkDir::new(store_a.join("objects-v1"))
        .into_iter()
        .flatten()
        .find(|e| e.file_type().is_file() && std::fs::read(e.path()).unwrap() == gone)
        .expect("the pyc's object")
        .into_path();
    std::fs::remove_file(&object).unwrap();
    let name = object.file_name().unwrap().to_str().unwrap();

    let pack = t.join("pycs.pack");
    let out = run_ok(pycstore(&store_a).arg("export").arg(&pack));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(name) && stderr.contains("was removed after the index was read"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 entries left out"),
        "{out:?}"
    );
    let imported = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(imported["entries_added"], 4, "{imported}");
    let copy = write_app(&t, "copy", "evicted", 3);
    assert_eq!(link(&store_b, &python, &copy, &[])["compiled"], 1);
}

#[test]
fn prefix_selects_what_was_linked_there_with_its_bodies() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let one = write_app(&t, "one", "first app", 4);
    let two = write_app(&t, "two", "second app", 3);
    // Timestamp pycs: their entries name the source's mtime, so only the
    // body entries can serve a copy of the sources.
    link(
        &store_a,
        &python,
        &one,
        &["--invalidation-mode", "timestamp"],
    );
    link(&store_a, &python, &two, &[]);

    let pack = t.join("one.pack");
    let exported = json_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(&pack)
            .arg("--prefix")
            .arg(&one),
    );
    assert_eq!(exported["entries"], 8, "{exported}");
    assert_eq!(exported["objects"], 4, "{exported}");
    run_ok(pycstore(&store_b).arg("import").arg(&pack));

    let one_copy = write_app(&t, "one-copy", "first app", 4);
    let two_copy = write_app(&t, "two-copy", "second app", 3);
    let linked = link(&store_b, &python, &one_copy, &[]);
    assert_eq!(linked["compiled"], 0, "{linked}");
    assert_eq!(linked["hits"], 4, "{linked}");
    assert_eq!(link(&store_b, &python, &two_copy, &[])["compiled"], 3);

    // A prefix nothing was linked into: an empty pack, and a warning.
    let out = run_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(t.join("none.pack"))
            .arg("--prefix")
            .arg(t.join("elsewhere")),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("records no pycs linked under"),
        "{out:?}"
    );
}

#[test]
fn dash_is_stdout_and_stdin() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "piped", 3);
    link(&store_a, &python, &app, &[]);

    let out = run_ok(pycstore(&store_a).args(["export", "-"]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exported 6 entries"),
        "{out:?}"
    );
    let pack = out.stdout;
    let mut import = pycstore(&store_b)
        .args(["import", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    import.stdin.take().unwrap().write_all(&pack).unwrap();
    let out: Output = import.wait_with_output().unwrap();
    assert_output!(out, out.status.success(), "import from stdin failed");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["entries_added"], 6, "{json}");

    // The pack and the JSON summary cannot share stdout.
    let out = run(pycstore(&store_a).args(["export", "-", "--json"]));
    assert_output!(
        out,
        out.status.code() == Some(2) && out.stdout.is_empty(),
        "expected a refusal"
    );
}
