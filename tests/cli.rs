//! What a user sees from `pycstore link` on awkward input: per-file reports,
//! exit codes, the negative cache, dry runs, excludes, symlinks and
//! read-only directories.

use std::os::unix::fs::PermissionsExt;

use crate::util::*;

#[test]
fn bad_files_are_reported_and_the_rest_is_linked() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/good.py", "x = 1\n");
    t.write("app/syntax.py", "def f(:\n");
    t.write("app/nul.py", b"x = 1\0\n");
    t.write("app/latin.py", b"# -*- coding: utf-8 -*-\nx = '\xe9'\n");
    t.write("app/py2.py", "print 'hello'\n");
    t.write("app/cookie.py", "# -*- coding: no-such-codec -*-\nx = 1\n");
    let app = t.join("app");

    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["compiled"], 1, "{json}");
    assert_eq!(json["failed"], 5, "{json}");
    let failures = json["failures"].as_array().unwrap();
    for name in ["syntax.py", "nul.py", "latin.py", "py2.py", "cookie.py"] {
        let f = failures
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} not reported: {json}"));
        assert!(
            f["message"].as_str().unwrap().contains("does not compile"),
            "{f}"
        );
    }
    assert!(app.join("__pycache__/good.cpython-311.pyc").exists());
    assert!(!app.join("__pycache__/syntax.cpython-311.pyc").exists());

    // Humans get one line per failure naming the file, and a summary.
    let out = run(t
        .pycstore()
        .args(["link", "--python"])
        .arg(&python)
        .arg(&app));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: does not compile",
            app.join("syntax.py").display()
        )),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5 failed"),
        "{out:?}"
    );

    // Failures are remembered: no worker is started for them again.
    let (_, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(json["compiled"], 0, "{json}");
    assert_eq!(json["failed"], 5, "{json}");
}

#[test]
fn dry_run_writes_nothing() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/a.py", "x = 1\n");
    let app = t.join("app");
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--dry-run", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_output!(out, out.status.success(), "dry run failed");
    assert_eq!(json["compiled"], 1, "{json}");
    assert!(pycs_under(&app).is_empty());
    assert!(pycs_under(&t.store()).is_empty());
}

#[test]
fn excludes_by_name_and_by_path() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/a.py", "");
    t.write("app/tests/t.py", "");
    t.write("app/pkg/vendored/v.py", "");
    t.write("app/pkg/kept.py", "");
    let app = t.join("app");
    run_ok(
        t.pycstore()
            .args([
                "link",
                "--exclude",
                "tests",
                "--exclude",
                "pkg/vendored",
                "--python",
            ])
            .arg(&python)
            .arg(&app),
    );
    let names: Vec<String> = pycs_under(&app)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "__pycache__/a.cpython-311.pyc",
            "pkg/__pycache__/kept.cpython-311.pyc"
        ]
    );
}

#[test]
fn never_writes_through_a_symlinked_pycache() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/a.py", "x = 1\n");
    t.write("app/sub/b.py", "x = 2\n");
    std::fs::create_dir(t.join("outside")).unwrap();
    std::os::unix::fs::symlink(t.join("outside"), t.join("app/sub/__pycache__")).unwrap();
    let app = t.join("app");
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["failed"], 1, "{json}");
    assert!(
        json["failures"][0]["message"]
            .as_str()
            .unwrap()
            .contains("symlink"),
        "{json}"
    );
    assert_eq!(
        std::fs::read_dir(t.join("outside")).unwrap().count(),
        0,
        "wrote through the symlink"
    );
    assert!(app.join("__pycache__/a.cpython-311.pyc").exists());
}

/// A linked `__pycache__` swapped for a symlink to where its pycs went:
/// the next link neither looks through it (its pycs would seem in place)
/// nor writes through it, and says so.
#[test]
fn a_pycache_swapped_for_a_symlink_after_linking_is_refused() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/sub/b.py", "x = 2\n");
    let app = t.join("app");
    let link = || {
        link_json(
            t.pycstore()
                .args(["link", "--python"])
                .arg(&python)
                .arg(&app),
        )
    };
    let (out, json) = link();
    assert_eq!(out.status.code(), Some(0), "{json}");
    std::fs::rename(app.join("sub/__pycache__"), t.join("outside")).unwrap();
    std::os::unix::fs::symlink(t.join("outside"), app.join("sub/__pycache__")).unwrap();
    let before: Vec<_> = std::fs::read_dir(t.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();

    let (out, json) = link();
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(
        (json["failed"].as_u64(), json["up_to_date"].as_u64()),
        (Some(1), Some(0)),
        "{json}"
    );
    assert!(
        json["failures"][0]["message"]
            .as_str()
            .unwrap()
            .contains("symlink"),
        "{json}"
    );
    let after: Vec<_> = std::fs::read_dir(t.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "wrote through the symlink");
}

#[test]
fn read_only_directories_are_reported_not_fatal() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/a.py", "x = 1\n");
    let ro = t.join("app/ro");
    t.write("app/ro/b.py", "x = 2\n");
    // Root ignores permission bits; the immutable attribute stops it too.
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let immutable = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&ro)
        .status();
    let locked = std::fs::write(ro.join("probe"), "").is_err();
    let app = t.join("app");
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(&app),
    );
    if immutable.is_ok_and(|s| s.success()) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&ro)
            .status();
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        locked,
        "could not make {} read-only for this user (chattr +i failed)",
        ro.display()
    );
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["compiled"], 1, "{json}");
    assert_eq!(json["failed"], 1, "{json}");
    let failure = &json["failures"][0];
    assert!(
        failure["path"].as_str().unwrap().ends_with("ro/b.py"),
        "{json}"
    );
    assert!(
        failure["message"].as_str().unwrap().contains("__pycache__"),
        "{json}"
    );
    assert!(app.join("__pycache__/a.cpython-311.pyc").exists(), "{json}");
}

#[test]
fn no_interpreter_is_a_clear_error() {
    let t = TestDir::new();
    t.write("app/a.py", "");
    let out = run(t.pycstore().arg("link").arg(t.join("app")));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no Python interpreter found") && stderr.contains("--python"),
        "{stderr}"
    );
}

#[test]
fn the_store_is_private_and_objects_read_only() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/a.py", "x = 1\n");
    run_ok(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(t.join("app")),
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&t.store()), 0o700);
    assert!(t.store().join("CACHEDIR.TAG").exists());
    let objects: Vec<_> = walkdir::WalkDir::new(t.store().join("objects-v1"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .collect();
    assert_eq!(objects.len(), 1);
    assert_eq!(mode(objects[0].path()), 0o444);
}

/// A wrapper interpreter whose first compile worker misbehaves (`mode`:
/// "crash" dies on its first request, "hang" never answers); later workers
/// are the real thing.
fn misbehaving_python(t: &TestDir, mode: &str) -> std::path::PathBuf {
    let real = python("3.11");
    let state = t.join("spawned");
    let bad = match mode {
        "crash" => "import os, sys; sys.stdout.write('pycstore-worker 1\\n'); sys.stdout.flush(); \
                    sys.stdin.buffer.readline(); os.kill(os.getpid(), 9)",
        _ => "import sys, time; sys.stdout.write('pycstore-worker 1\\n'); sys.stdout.flush(); time.sleep(600)",
    };
    let script = format!(
        "#!/bin/bash\n\
         # A compile worker is started as `python -I -S -W ignore ...`.\n\
         if [ \"$1\" = -I ] && [ \"$2\" = -S ] && [ \"$3\" = -W ] && [ ! -e '{state}' ]; then\n\
         \x20 touch '{state}'\n\
         \x20 exec '{real}' -c \"{bad}\"\n\
         fi\n\
         exec '{real}' \"$@\"\n",
        state = state.display(),
        real = real.display(),
    );
    let path = t.write("bin/python3", script);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_crashed_or_hung_worker_is_replaced_and_its_file_reported() {
    for mode in ["crash", "hang"] {
        let t = TestDir::new();
        let python = misbehaving_python(&t, mode);
        for name in ["a", "b", "c"] {
            t.write(format!("app/{name}.py"), format!("{name} = 1\n"));
        }
        let app = t.join("app");
        let started = std::time::Instant::now();
        let (out, json) = link_json(
            t.pycstore()
                .args(["link", "-j", "1", "--compile-timeout", "3", "--python"])
                .arg(&python)
                .arg(&app),
        );
        assert_eq!(out.status.code(), Some(1), "{mode}: {json}");
        assert_eq!(
            (json["compiled"].as_u64(), json["failed"].as_u64()),
            (Some(2), Some(1)),
            "{mode}: {json}"
        );
        let message = json["failures"][0]["message"].as_str().unwrap();
        let expected = if mode == "crash" {
            "died"
        } else {
            "longer than 3s"
        };
        assert!(message.contains(expected), "{mode}: {message}");
        assert!(
            started.elapsed().as_secs() < 60,
            "{mode}: the run waited for the hung worker"
        );
        // Not the source's fault, so not remembered: the next run compiles it.
        let (out, json) = link_json(
            t.pycstore()
                .args(["link", "--python"])
                .arg(&python)
                .arg(&app),
        );
        assert_output!(out, out.status.success(), "{mode}: second run");
        assert_eq!(json["compiled"], 1, "{mode}: {json}");
    }
}

/// A process may start with a low soft limit of open files (1,024 on many
/// systems; 128 here). A tree with more directories of sources than that
/// is linked whole, warm as cold: `pycstore` raises its soft limit towards
/// the hard one.
#[test]
fn a_low_soft_limit_of_open_files_does_not_fail_a_large_tree() {
    let python = python("3.11");
    let t = TestDir::new();
    let dirs = 400;
    for i in 0..dirs {
        t.write(format!("tree/pkg{i:03}/__init__.py"), format!("X = {i}\n"));
    }
    let tree = t.join("tree");
    let limited = |args: &[&std::ffi::OsStr]| {
        let base = t.pycstore();
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg("ulimit -Sn 128 && exec \"$@\"")
            .arg("sh")
            .arg(base.get_program())
            .args(base.get_args())
            .args(args);
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    };
    let args = [
        "link".as_ref(),
        "--python".as_ref(),
        python.as_os_str(),
        tree.as_os_str(),
    ];
    let (out, cold) = link_json(&mut limited(&args));
    assert!(out.status.success(), "{cold}");
    assert_eq!(cold["compiled"], dirs, "{cold}");
    remove_pycache(&tree);
    let (out, warm) = link_json(&mut limited(&args));
    assert!(out.status.success(), "{warm}");
    assert_eq!(warm["hits"], dirs, "{warm}");
    assert_eq!(warm["failed"], 0, "{warm}");
}

/// A link holds a descriptor for each directory with sources (and its
/// `__pycache__`) until its pycs are placed. A tree with more of them than
/// the limit on open files allows (a hard limit of 1,024 is common) still
/// links whole, cold, warm into a copy and again; what finds no room is
/// opened when used. Before, most sources failed with "Too many open
/// files".
#[test]
fn links_more_directories_than_open_files_allow() {
    let t = TestDir::new();
    let python = python("3.11");
    let venv = t.join("venv");
    make_venv(&python, &venv);
    let site = venv.join("lib/python3.11/site-packages");
    let packages = 400;
    let mut imports = String::new();
    for i in 0..packages {
        t.write(
            site.join(format!("many_{i}/__init__.py")),
            format!("from . import sub\nVALUE = {i}\n"),
        );
        t.write(
            site.join(format!("many_{i}/sub/__init__.py")),
            format!("SUB = {i} * 2\n"),
        );
        imports.push_str(&format!("import many_{i}\n"));
    }
    let link = |prefix: &std::path::Path, limit: u32| {
        let mut cmd = t.pycstore();
        cmd.arg("link").arg(prefix);
        link_json(&mut with_open_file_limit(&cmd, limit))
    };
    // 512: room for some directories (the rest opened when used); 128:
    // for none.
    let (out, json) = link(&venv, 512);
    assert_output!(
        out,
        out.status.success(),
        "cold link under 512 open files: {json}"
    );
    assert_eq!(json["failed"], 0, "{json}");
    assert!(json["compiled"].as_u64().unwrap() > 2 * packages, "{json}");
    let copy = t.join("copy");
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&venv)
            .arg(&copy),
    );
    remove_pycache(&copy);
    for limit in [128, 512] {
        let (out, json) = link(&copy, limit);
        assert_output!(out, out.status.success(), "warm link under {limit}: {json}");
        assert_eq!(json["failed"], 0, "{json}");
        assert_eq!(json["compiled"], 0, "{json}");
        remove_pycache(&copy);
    }
    let (_, json) = link(&copy, 128);
    assert_eq!(json["failed"], 0, "{json}");
    let (out, json) = link(&copy, 128);
    assert_output!(out, out.status.success(), "re-link under 128: {json}");
    assert_eq!(json["up_to_date"], json["pycs"], "{json}");
    let log = python_v(&copy.join("bin/python"), &["-c", &imports], &[]);
    assert_nothing_compiled(&log, &copy, 2 * packages as usize);
}
