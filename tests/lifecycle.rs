//! `status`, `unlink` and `stats` on a real venv, and who may use a store.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use crate::util::*;

fn status_counts(t: &TestDir, prefix: &std::path::Path) -> serde_json::Value {
    let out = run_ok(t.pycstore().arg("status").arg(prefix).arg("--json"));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let interpreters = json["interpreters"].as_object().unwrap();
    assert_eq!(interpreters.len(), 1, "{json}");
    interpreters.values().next().unwrap().clone()
}

#[test]
fn status_tells_store_foreign_stale_and_missing() {
    let t = TestDir::new();
    let venv = t.join("venv");
    make_venv(&python("3.11"), &venv);
    let before = status_counts(&t, &venv);
    let pycs = before["pycs"].as_u64().unwrap();
    assert!(pycs > 300, "{before}");
    assert_eq!(before["missing"], pycs, "{before}");

    run_ok(t.pycstore().arg("link").arg(&venv).arg("-q"));
    let linked = status_counts(&t, &venv);
    assert_eq!(linked["from_store"], pycs, "{linked}");

    // Python compiles an edited module itself: that pyc is foreign. A pyc
    // whose source changed afterwards is stale. A removed pyc is missing.
    let site = venv.join("lib/python3.11/site-packages/pip");
    std::fs::write(site.join("__main__.py"), "print('edited')\n").unwrap();
    let py = venv.join("bin/python");
    run_ok(
        Command::new(&py)
            .args(["-c", "import pip.__main__"])
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );
    std::fs::write(site.join("__init__.py"), "# changed\n").unwrap();
    std::fs::remove_file(site.join("__pycache__/py.cpython-311.pyc")).ok();
    let removed = std::fs::remove_file(site.join("_internal/__pycache__/main.cpython-311.pyc"));
    assert!(removed.is_ok());
    let after = status_counts(&t, &venv);
    assert_eq!(after["foreign"], 1, "{after}");
    assert_eq!(after["stale"], 1, "{after}");
    assert_eq!(after["missing"], 1, "{after}");
    assert_eq!(after["from_store"], pycs - 3, "{after}");
}

#[test]
fn unlink_removes_only_what_link_placed() {
    let t = TestDir::new();
    let app = t.join("app");
    t.write("app/pkg/__init__.py", "");
    t.write("app/pkg/a.py", "A = 1\n");
    let edited = t.write("app/pkg/b.py", "B = 1\n");
    t.write("app/other/c.py", "C = 1\n");
    // A pyc and a __pycache__ that were there before pycstore.
    std::fs::create_dir(t.join("app/other/__pycache__")).unwrap();
    let mine = t.write("app/other/__pycache__/notes.txt", "keep me");
    let python = python("3.11");
    run_ok(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(pycs_under(&app).len(), 4);

    // Python rewrites the pyc of an edited source: no longer pycstore's.
    std::fs::write(&edited, "B = 2\n").unwrap();
    run_ok(
        Command::new(&python)
            .args(["-c", "import pkg.b"])
            .env("PYTHONPATH", &app)
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );

    let out = run_ok(t.pycstore().args(["unlink", "--json"]).arg(&app));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (json["removed"].as_u64(), json["changed"].as_u64()),
        (Some(3), Some(1)),
        "{json}"
    );
    let left: Vec<String> = pycs_under(&app)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(left, ["pkg/__pycache__/b.cpython-311.pyc"]);
    assert!(mine.exists(), "unlink removed a file it did not place");
    assert!(t.join("app/other/__pycache__").is_dir());
    // The sources are untouched and the store still has its objects.
    assert_eq!(
        std::fs::read_to_string(t.join("app/pkg/a.py")).unwrap(),
        "A = 1\n"
    );
    // Linking again compiles only the edited source (the store never had
    // it; Python's checked-hash pyc of it has the same bytes and is kept).
    let (_, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(json["compiled"], 1, "{json}");
    assert_eq!(json["up_to_date"], 0, "{json}");
    assert_eq!(json["hits"], 3, "{json}");
}

#[test]
fn stats_counts_and_zeroes() {
    let t = TestDir::new();
    let python = python("3.11");
    for prefix in ["a", "b"] {
        t.write(format!("{prefix}/m.py"), "X = 1\n");
        t.write(format!("{prefix}/same.py"), "X = 1\n");
        t.write(format!("{prefix}/bad.py"), "def (:\n");
    }
    run(t
        .pycstore()
        .args(["link", "--python"])
        .arg(&python)
        .arg(t.join("a")));
    run(t
        .pycstore()
        .args(["link", "--python"])
        .arg(&python)
        .arg(t.join("b")));
    let out = run_ok(t.pycstore().args(["stats", "--json"]));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stats["objects"], 1,
        "identical sources share one object: {stats}"
    );
    assert_eq!(stats["linked_pycs"], 4, "{stats}");
    assert!(stats["dedup_ratio"].as_f64().unwrap() > 3.9, "{stats}");
    assert_eq!(stats["known_failures"], 1, "{stats}");
    let usage = stats["usage"].as_object().unwrap();
    let (label, c) = usage.iter().next().unwrap();
    assert!(label.starts_with("cpython-311 "), "{label}");
    assert_eq!(
        (
            c["hits"].as_u64(),
            c["misses"].as_u64(),
            c["compiles"].as_u64(),
            c["failures"].as_u64()
        ),
        (Some(2), Some(2), Some(2), Some(2)),
        "{stats}"
    );
    let human = run_ok(t.pycstore().args(["stats", "--zero"]));
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("50.0% hit rate"),
        "{human:?}"
    );
    let out = run_ok(t.pycstore().args(["stats", "--json"]));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(stats["usage"].as_object().unwrap().is_empty(), "{stats}");
    assert!(stats["since"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn a_store_of_another_user_is_refused_unless_shared() {
    let t = TestDir::new();
    t.write("app/m.py", "X = 1\n");
    let python = python("3.11");
    run_ok(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(t.join("app")),
    );
    assert_eq!(std::fs::metadata(t.store()).unwrap().mode() & 0o7777, 0o700);
    // Hand the store to another user: refused, with what to do.
    std::os::unix::fs::chown(t.store(), Some(65534), None).unwrap();
    let out = run(t
        .pycstore()
        .args(["link", "--python"])
        .arg(&python)
        .arg(t.join("app")));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to use the store") && stderr.contains("--shared-group"),
        "{stderr}"
    );
    std::os::unix::fs::chown(t.store(), Some(0), None).unwrap();

    // A store made writable by everyone is refused too.
    std::fs::set_permissions(t.store(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(t.pycstore().arg("stats"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    std::fs::set_permissions(t.store(), std::fs::Permissions::from_mode(0o700)).unwrap();

    // Created shared with a group the caller is in: usable by its members.
    let shared = t.join("shared");
    let out = run_ok(
        pycstore(&shared)
            .args(["--shared-group", "root", "link", "--python"])
            .arg(&python)
            .arg(t.join("app")),
    );
    assert!(out.status.success());
    let meta = std::fs::metadata(&shared).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o2770);
    assert_eq!(meta.gid(), 0);
    // The group's members can open the index after this process wrote it.
    for entry in std::fs::read_dir(shared.join("index-v2"))
        .unwrap()
        .flatten()
    {
        let mode = entry.metadata().unwrap().mode();
        assert_eq!(
            mode & 0o060,
            0o060,
            "{} is not group-writable",
            entry.path().display()
        );
    }
    std::os::unix::fs::chown(&shared, Some(65534), None).unwrap();
    run_ok(pycstore(&shared).arg("stats"));
}

/// A prefix that already holds valid checked-hash pycs the store does not
/// know (made by `compileall`, as uv makes them): `link` says it compiled
/// them, remembers them as linked, and `export --prefix` carries every one.
/// pycs made on purpose in another invalidation mode are replaced, and the
/// summary says so.
#[test]
fn pycs_the_store_does_not_know_are_counted_recorded_and_exported() {
    let python = python("3.11");
    let t = TestDir::new();
    for i in 0..12 {
        t.write(format!("app/pkg/m{i}.py"), format!("VALUE = {i}\n"));
    }
    t.write("app/pkg/__init__.py", "");
    let app = t.join("app");
    run_ok(
        Command::new(&python)
            .args([
                "-m",
                "compileall",
                "-q",
                "--invalidation-mode",
                "checked-hash",
            ])
            .arg(&app)
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_output!(out, out.status.success(), "link failed");
    assert_eq!(json["pycs"], 13, "{json}");
    assert_eq!(json["compiled"], 13, "{json}");
    assert_eq!(json["up_to_date"], 0, "{json}");
    assert_eq!(json["replaced_other_mode"], 0, "{json}");
    // Linked again: up to date, nothing compiled.
    let (_, again) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(again["up_to_date"], 13, "{again}");
    assert_eq!(again["compiled"], 0, "{again}");
    // Every pyc is remembered: the pack of the prefix carries every object.
    let pack = t.join("app.pack");
    let out = run_ok(
        t.pycstore()
            .args(["export", "--json", "--prefix"])
            .arg(&app)
            .arg(&pack),
    );
    let exported: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 13 sources, 12 distinct bodies... and the empty __init__ of its own.
    assert_eq!(exported["objects"], 13, "{exported}");
    let out = run_ok(
        t.pycstore()
            .args(["unlink", "--dry-run", "--json"])
            .arg(&app),
    );
    let unlinked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(unlinked["removed"], 13, "{unlinked}");

    // Unchecked-hash pycs made on purpose: replaced, and said.
    remove_pycache(&app);
    run_ok(
        Command::new(&python)
            .args([
                "-m",
                "compileall",
                "-q",
                "--invalidation-mode",
                "unchecked-hash",
            ])
            .arg(&app)
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );
    let out = run_ok(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .contains("replaced 13 pycs made in another invalidation mode with checked-hash ones"),
        "{stdout}"
    );
}

/// Writes each `(path, text)` under `t`, as a tree to link.
fn write_tree(t: &TestDir, files: &[(&str, &str)]) {
    for (path, text) in files {
        t.write(path, text);
    }
}

/// Links `app` for CPython 3.11, and checks how many pycs were placed
/// (compiled, or hits: empty modules share one object) and how many were
/// up to date.
fn link_expecting(t: &TestDir, app: &std::path::Path, placed: u64, up_to_date: u64) {
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(python("3.11"))
            .arg(app),
    );
    assert_output!(out, out.status.success(), "link");
    let done = json["compiled"].as_u64().unwrap() + json["hits"].as_u64().unwrap();
    assert_eq!(
        (done, json["up_to_date"].as_u64()),
        (placed, Some(up_to_date)),
        "{json}"
    );
}

/// A re-link of a prefix walks directories it listed before by one `stat`
/// each (their listing records); every change below them is still seen:
/// a module added, a package added deeper down, a module edited in place
/// (its directory unchanged), a package swapped for a symlink.
#[test]
fn relink_sees_every_change_below_directories_it_listed_before() {
    let t = TestDir::new();
    let app = t.join("app");
    write_tree(
        &t,
        &[
            ("app/top.py", "TOP = 1\n"),
            ("app/pkg/__init__.py", ""),
            ("app/pkg/a.py", "A = 1\n"),
            ("app/pkg/sub/__init__.py", ""),
            ("app/pkg/sub/b.py", "B = 1\n"),
            ("app/pkg/gone/__init__.py", ""),
            ("app/pkg/gone/g.py", "G = 1\n"),
        ],
    );
    let link = |placed, up_to_date| link_expecting(&t, &app, placed, up_to_date);
    link(7, 0);
    // Listings are trusted once older than the filesystem's clock tick.
    std::thread::sleep(std::time::Duration::from_millis(250));
    link(0, 7);
    std::thread::sleep(std::time::Duration::from_millis(250));

    t.write("app/pkg/c.py", "C = 1\n");
    t.write("app/pkg/sub/deep/__init__.py", "");
    t.write("app/pkg/sub/deep/d.py", "D = 1\n");
    std::fs::write(app.join("top.py"), "TOP = 2\n").unwrap();
    let elsewhere = t.join("elsewhere");
    std::fs::rename(app.join("pkg/gone"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, app.join("pkg/gone")).unwrap();
    let before: Vec<_> = pycs_under(&elsewhere);

    // c, deep/__init__, deep/d and the edited top are placed; the symlinked
    // package is no longer walked (and nothing is written through it).
    link(4, 4);
    assert_eq!(pycs_under(&elsewhere), before);
    let log = python_v(
        &python("3.11"),
        &[
            "-c",
            "import top, pkg.a, pkg.c, pkg.sub.b, pkg.sub.deep.d; assert top.TOP == 2",
        ],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, &app, 7);
}

/// A directory replaced since the last link (a package reinstalled, a
/// fresh copy where a linked prefix was) is walked as new, and so is
/// everything below it, without asking the index about each subdirectory:
/// still, a subdirectory moved into it whole keeps its placed pycs, and
/// every change in it is seen. (That the index is not asked is shown by
/// the walk's own tests, `walk::tests::below_a_replaced_directory_*`.)
#[test]
fn relink_below_a_replaced_directory_sees_moved_and_changed_subtrees() {
    let t = TestDir::new();
    let app = t.join("app");
    write_tree(
        &t,
        &[
            ("app/pkg/__init__.py", ""),
            ("app/pkg/a.py", "A = 1\n"),
            ("app/pkg/sub/__init__.py", ""),
            ("app/pkg/sub/b.py", "B = 1\n"),
            ("app/pkg/sub/deep/__init__.py", ""),
            ("app/pkg/sub/deep/d.py", "D = 1\n"),
        ],
    );
    let link = |placed, up_to_date| link_expecting(&t, &app, placed, up_to_date);
    link(6, 0);
    std::thread::sleep(std::time::Duration::from_millis(250));
    link(0, 6);
    std::thread::sleep(std::time::Duration::from_millis(250));

    // `pkg` replaced by a new directory, `sub` moved into it whole (same
    // inode, its `__pycache__` with it), `a.py` new, `deep/d.py` edited.
    let old = t.join("old");
    std::fs::rename(app.join("pkg"), &old).unwrap();
    std::fs::create_dir(app.join("pkg")).unwrap();
    std::fs::rename(old.join("sub"), app.join("pkg/sub")).unwrap();
    std::fs::remove_dir_all(&old).unwrap();
    t.write("app/pkg/__init__.py", "");
    t.write("app/pkg/a.py", "A = 2\n");
    std::fs::write(app.join("pkg/sub/deep/d.py"), "D = 2\n").unwrap();

    // `pkg`'s two and the edited `d` placed; the rest of `sub` up to date.
    link(3, 3);
    let log = python_v(
        &python("3.11"),
        &[
            "-c",
            "import pkg.a, pkg.sub.b, pkg.sub.deep.d; assert (pkg.a.A, pkg.sub.deep.d.D) == (2, 2)",
        ],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, &app, 6);
}
