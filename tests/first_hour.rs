//! The first hour with pycstore: what a new user types, mistypes and reads.
//! Every count is the one the other commands give, every message names what
//! is wrong and what to do, and read-only commands leave no store behind.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::fuse::{fuse_available, is_mounted, reported};
use crate::util::*;

/// The binary with no `--store` flag and none of pycstore's variables set,
/// its default store under `home`.
fn bare(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pycstore"));
    for var in [
        "PYCSTORE_DIR",
        "PYCSTORE_SHARED_GROUP",
        "PYCSTORE_TRUST_PYTHON",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home);
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}{}", stdout(out), stderr(out)))
}

/// An application directory of `n` small modules.
fn app(t: &TestDir, n: usize) -> PathBuf {
    for i in 0..n {
        t.write(format!("app/mod_{i}.py"), format!("VALUE = {i}\n"));
    }
    t.join("app")
}

/// The total size of the pycs under `root`, as the summaries print it.
fn pyc_bytes(root: &Path) -> u64 {
    pycs_under(root)
        .iter()
        .map(|p| std::fs::metadata(root.join(p)).unwrap().len())
        .sum()
}

fn link(t: &TestDir, python: &Path, prefix: &Path) {
    run_ok(
        t.pycstore()
            .args(["link", "-q", "--python"])
            .arg(python)
            .arg(prefix),
    );
}

/// The counts `status --json` gives for the only interpreter.
fn status(t: &TestDir, python: &Path, prefix: &Path) -> serde_json::Value {
    let out = run_ok(
        t.pycstore()
            .args(["status", "--json", "--python"])
            .arg(python)
            .arg(prefix),
    );
    let json = json(&out);
    json["interpreters"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone()
}

#[test]
fn unlink_says_what_a_dry_run_would_do_and_what_a_run_did() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 2);
    link(&t, &python, &app);
    let bytes = pyc_bytes(&app);

    let out = run_ok(t.pycstore().args(["unlink", "--dry-run"]).arg(&app));
    assert_eq!(
        stdout(&out),
        format!(
            "dry run: would remove 2 pycs ({bytes} B) and 1 empty __pycache__ directory; \
             0 changed since linking would be left alone\n"
        )
    );
    assert_eq!(pycs_under(&app).len(), 2, "a dry run removed pycs");

    let out = run_ok(t.pycstore().arg("unlink").arg(&app));
    assert_eq!(
        stdout(&out),
        format!(
            "removed 2 pycs ({bytes} B) and 1 empty __pycache__ directory; \
             0 changed since linking were left alone\n"
        )
    );
    assert!(!app.join("__pycache__").exists());
}

/// `status` calls from the store exactly the pycs `unlink` would remove,
/// after Python recompiled an edited source and `link` ran again.
#[test]
fn status_and_unlink_agree_after_python_recompiles() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 2);
    link(&t, &python, &app);
    assert_eq!(status(&t, &python, &app)["from_store"], 2);

    std::fs::write(app.join("mod_0.py"), "VALUE = 'edited'\n").unwrap();
    run_ok(
        Command::new(&python)
            .args(["-c", "import mod_0"])
            .env("PYTHONPATH", &app)
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );
    link(&t, &python, &app);

    let counts = status(&t, &python, &app);
    let out = run_ok(t.pycstore().args(["unlink", "-n", "--json"]).arg(&app));
    let unlink = json(&out);
    assert_eq!(counts["from_store"], unlink["removed"], "{counts} {unlink}");
    assert_eq!(counts["foreign"], unlink["changed"], "{counts} {unlink}");
    assert_eq!(counts["pycs"], 2, "{counts}");
    assert_eq!(counts["stale"], 0, "{counts}");

    // Python's own pyc (not what link placed, whatever link made of it)
    // stays; pycstore's goes.
    let removed = unlink["removed"].as_u64().unwrap();
    let out = run_ok(t.pycstore().arg("unlink").arg(&app));
    assert!(
        stdout(&out).starts_with(&format!(
            "removed {removed} {}",
            if removed == 1 { "pyc " } else { "pycs" }
        )),
        "{}",
        stdout(&out)
    );
    assert_eq!(pycs_under(&app).len() as u64, 2 - removed);
}

/// `link` makes a directory's `__pycache__` before its pycs are placed: one
/// that ends up with none (its only source does not compile) is still the
/// run's, and `unlink` removes it with the others.
#[test]
fn unlink_removes_a_pycache_link_made_that_got_no_pyc() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 1);
    t.write("app/broken/bad.py", "def f(:\n");
    let out = run(t
        .pycstore()
        .args(["link", "-q", "--python"])
        .arg(&python)
        .arg(&app));
    assert!(
        !out.status.success(),
        "a source that does not compile fails"
    );
    assert!(app.join("broken/__pycache__").is_dir());
    assert!(pycs_under(&app.join("broken")).is_empty());
    let bytes = pyc_bytes(&app);
    let out = run_ok(t.pycstore().arg("unlink").arg(&app));
    assert_eq!(
        stdout(&out),
        format!(
            "removed 1 pyc ({bytes} B) and 2 empty __pycache__ directories; \
             0 changed since linking were left alone\n"
        )
    );
    assert!(!app.join("broken/__pycache__").exists());
    assert!(!app.join("__pycache__").exists());
}

/// After `gc` evicted their objects, the pycs pycstore placed are still its
/// own: `status` counts them from the store and `unlink` removes them.
#[test]
fn pycs_of_evicted_objects_are_still_pycstores() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 2);
    link(&t, &python, &app);
    let bytes = pyc_bytes(&app);
    run_ok(t.pycstore().args(["gc", "--max-size", "0"]));
    let objects = walkdir::WalkDir::new(t.store().join("objects-v1"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .count();
    assert_eq!(objects, 0, "gc left objects");

    let counts = status(&t, &python, &app);
    assert_eq!(
        (counts["from_store"].as_u64(), counts["foreign"].as_u64()),
        (Some(2), Some(0))
    );
    let out = run_ok(t.pycstore().arg("unlink").arg(&app));
    assert_eq!(
        stdout(&out),
        format!(
            "removed 2 pycs ({bytes} B) and 1 empty __pycache__ directory; \
             0 changed since linking were left alone\n"
        )
    );
}

#[test]
fn a_prefix_that_is_not_a_directory_is_a_mistake_on_the_command_line() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 1);
    let file = app.join("mod_0.py");
    let missing = t.join("nonexistent");
    let sources = "a prefix is a directory of Python sources (a venv, an install, a source tree)";

    let cases: Vec<(Vec<&OsStr>, String)> = vec![
        (
            vec!["link".as_ref(), missing.as_os_str()],
            format!("`{}` does not exist: {sources}", missing.display()),
        ),
        (
            vec!["link".as_ref(), file.as_os_str()],
            format!(
                "`{}` is a file, not a prefix: pycstore links every source of a directory \
                 (a venv, an install, a source tree); pass its directory, `{}`",
                file.display(),
                app.display()
            ),
        ),
        (
            vec![
                "link".as_ref(),
                "--python".as_ref(),
                python.as_os_str(),
                file.as_os_str(),
            ],
            format!(
                "`{}` is a file, not a prefix: pycstore links every source of a directory \
                 (a venv, an install, a source tree); pass its directory, `{}`",
                file.display(),
                app.display()
            ),
        ),
        (
            vec!["unlink".as_ref(), missing.as_os_str()],
            format!("`{}` does not exist: {sources}", missing.display()),
        ),
        (
            vec![
                "status".as_ref(),
                "--python".as_ref(),
                python.as_os_str(),
                missing.as_os_str(),
            ],
            format!("`{}` does not exist: {sources}", missing.display()),
        ),
    ];
    for (args, message) in cases {
        let out = run(t.pycstore().args(&args));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!("pycstore: error: {message}\n"),
            "{args:?}"
        );
        assert_eq!(stdout(&out), "", "{args:?}");
    }

    // A directory without an interpreter names every place looked at.
    let out = run(t.pycstore().arg("link").arg(&app));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "pycstore: error: no Python interpreter found in `{}` (looked for bin/python3, \
             bin/python, bin/pypy3, bin/pypy, bin/python3.N); pass `--python PATH`\n",
            app.display()
        )
    );
}

#[test]
fn read_only_commands_create_no_store() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 1);
    let typo = t.join("typo/deep/store");
    let pack = t.join("pycs.pack");
    let no_store = format!(
        "pycstore: error: there is no store at `{}` (from environment PYCSTORE_DIR); \
         `pycstore link` creates one\n",
        typo.display()
    );
    let commands: [&[&OsStr]; 6] = [
        &["stats".as_ref()],
        &["stats".as_ref(), "--json".as_ref()],
        &["verify".as_ref()],
        &["gc".as_ref(), "--max-size".as_ref(), "1G".as_ref()],
        &["unlink".as_ref(), app.as_os_str()],
        &["export".as_ref(), pack.as_os_str()],
    ];
    for args in commands {
        let out = run(bare(t.path()).env("PYCSTORE_DIR", &typo).args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(stderr(&out), no_store, "{args:?}");
        assert_eq!(stdout(&out), "", "{args:?}");
    }
    // `status` reports on what is there: nothing is from a store.
    let out = run(bare(t.path())
        .env("PYCSTORE_DIR", &typo)
        .args(["status", "--python"])
        .arg(&python)
        .arg(&app));
    assert_output!(out, out.status.success(), "status without a store");
    assert_eq!(
        stderr(&out),
        format!(
            "pycstore: there is no store at `{}` yet: no pyc is from it\n",
            typo.display()
        )
    );
    assert!(
        stdout(&out).ends_with(
            ": 1 pycs: 0 from the store, 0 foreign, 0 stale, 1 missing (0 do not compile)\n"
        ),
        "{}",
        stdout(&out)
    );
    assert!(
        !t.join("typo").exists(),
        "a read-only command created the store"
    );
    assert!(!pack.exists());

    // The default location is named as such.
    let out = run(bare(t.path()).arg("stats"));
    assert_eq!(
        stderr(&out),
        format!(
            "pycstore: error: there is no store at `{}` (the default; --store or PYCSTORE_DIR \
             names another); `pycstore link` creates one\n",
            t.join(".cache/pycstore").display()
        )
    );
    assert!(!t.join(".cache").exists());
}

#[test]
fn store_variables_are_not_flags_typed() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 1);

    // An empty PYCSTORE_DIR is unset: the default store.
    let out = run(bare(t.path()).env("PYCSTORE_DIR", "").arg("stats"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "there is no store at `{}` (the default;",
            t.join(".cache/pycstore").display()
        )),
        "{}",
        stderr(&out)
    );
    let out = run(bare(t.path())
        .env("PYCSTORE_DIR", "")
        .args(["link", "-q", "--python"])
        .arg(&python)
        .arg(&app));
    assert_output!(out, out.status.success(), "link with PYCSTORE_DIR=");
    assert!(t.join(".cache/pycstore/objects-v1").is_dir());

    // A variable is not shown in a usage line as if it had been typed.
    let usage = |cmd: &mut Command| stderr(&run(cmd.arg("link")));
    let plain = usage(&mut bare(t.path()));
    assert!(plain.contains("Usage: pycstore link"), "{plain}");
    assert_eq!(
        usage(bare(t.path()).env("PYCSTORE_DIR", t.join("store"))),
        plain
    );
    assert_eq!(
        usage(bare(t.path()).env("PYCSTORE_TRUST_PYTHON", "1")),
        plain
    );

    // PYCSTORE_TRUST_PYTHON=1, as documented.
    let out = run(bare(t.path())
        .env("PYCSTORE_TRUST_PYTHON", "1")
        .args(["link", "-q", "--python"])
        .arg(&python)
        .arg(&app));
    assert_output!(out, out.status.success(), "PYCSTORE_TRUST_PYTHON=1");

    // Every variable set but empty (as a CI template's `${{ cond && '1' ||
    // '' }}` leaves it) counts as unset, not as a bad value.
    let mut cmd = bare(t.path());
    for var in [
        "PYCSTORE_DIR",
        "PYCSTORE_REMOTE",
        "PYCSTORE_REMOTE_READ_ONLY",
        "PYCSTORE_REMOTE_TIMEOUT",
        "PYCSTORE_REMOTE_NAMESPACE",
        "PYCSTORE_REMOTE_SIGNING_KEY",
        "PYCSTORE_REMOTE_TRUSTED_KEYS",
        "PYCSTORE_REMOTE_JOBS",
        "PYCSTORE_COMPILE_TIMEOUT",
        "PYCSTORE_JOBS",
        "PYCSTORE_LINK_MODE",
        "PYCSTORE_INVALIDATION_MODE",
        "PYCSTORE_EXCLUDE",
        "PYCSTORE_SHARED_GROUP",
        "PYCSTORE_TRUST_PYTHON",
    ] {
        cmd.env(var, "");
    }
    let out = run(cmd
        .args(["link", "--json", "--python"])
        .arg(&python)
        .arg(&app));
    assert_output!(out, out.status.success(), "link with every variable empty");
    assert_eq!(json(&out)["up_to_date"], 1);
}

#[test]
fn jobs_zero_means_one_per_cpu() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 3);
    let out = run_ok(t.pycstore().args(["link", "--help"]));
    assert!(
        stdout(&out).contains(
            "Compile processes per interpreter; 0 means the number of CPUs, as for compileall \
             -j0 [default: the number of CPUs]"
        ),
        "{}",
        stdout(&out)
    );
    let out = run_ok(
        t.pycstore()
            .args(["link", "-j", "0", "--json", "--python"])
            .arg(&python)
            .arg(&app),
    );
    assert_eq!(json(&out)["compiled"], 3);
    let out = run(t
        .pycstore()
        .args(["mount", "--threads", "0", "--over", "x"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: invalid value '0' for '--threads <N>'"),
        "{}",
        stderr(&out)
    );
}

/// Each help page starts with what the command is for and one example,
/// and lists the global options once, under their own heading, only where
/// they matter.
#[test]
fn help_starts_with_purpose_and_example_and_lists_global_options_apart() {
    let t = TestDir::new();
    let pages = [
        ("link", "pycstore link .venv", true, true, true),
        (
            "unlink",
            "pycstore unlink --dry-run .venv",
            true,
            false,
            false,
        ),
        ("status", "pycstore status .venv", true, false, true),
        ("stats", "pycstore stats --json", true, false, false),
        ("gc", "pycstore gc --max-size 2G", true, false, false),
        ("verify", "pycstore verify --repair", true, false, false),
        (
            "export",
            "pycstore export pycs.pack --prefix .venv",
            true,
            false,
            true,
        ),
        ("import", "pycstore import pycs.pack", true, true, false),
        (
            "mount",
            "pycstore mount --source /opt/env /mnt/env --daemon",
            true,
            true,
            true,
        ),
        ("unmount", "pycstore unmount /mnt/env", false, false, false),
        ("config", "pycstore config --json", true, false, false),
        (
            "completions",
            "pycstore completions bash > ~/.local/share/bash-completion/completions/pycstore",
            false,
            false,
            false,
        ),
        (
            "man",
            "pycstore man --dir ~/.local/share/man/man1",
            false,
            false,
            false,
        ),
    ];
    for (name, example, store, group, trust) in pages {
        for flag in ["-h", "--help"] {
            let out = run_ok(bare(t.path()).env("PYCSTORE_DIR", "/x").args([name, flag]));
            let help = stdout(&out);
            let (about, rest) = help.split_once("\n\n").unwrap();
            assert!(!about.is_empty() && !about.contains('\n'), "{name}: {help}");
            assert!(
                rest.starts_with(&format!("Example: {example}\n\nUsage: pycstore {name} ")),
                "{name}: {help}"
            );
            assert_eq!(help.matches("Global options:").count(), 1, "{name}: {help}");
            let (own, global) = help.split_once("Global options:").unwrap();
            for (option, shown) in [
                ("--store <DIR>", store),
                ("--shared-group <GROUP>", group),
                ("--trust-python", trust),
                ("--verbose", true),
            ] {
                assert!(!own.contains(option), "{name}: {option} among its options");
                assert_eq!(
                    global.matches(option).count(),
                    usize::from(shown),
                    "{name} {flag}: {option}\n{help}"
                );
            }
        }
    }
    let out = run_ok(bare(t.path()).arg("--help"));
    assert!(
        stdout(&out).starts_with(
            "Compile Python bytecode once per machine and link it into every environment\n\n\
             Example: pycstore link .venv\n\nUsage: pycstore [OPTIONS] <COMMAND>\n"
        ),
        "{}",
        stdout(&out)
    );
}

#[test]
fn mount_names_what_is_missing_once_and_the_view_that_was_meant() {
    let t = TestDir::new();
    let app = app(&t, 1);
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let missing = t.join("missing");

    let out = run(t
        .pycstore()
        .args(["mount", "--source"])
        .arg(&app)
        .arg(&missing));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "pycstore: error: the mount point `{}` does not exist: create it first (the mount \
             point is an existing directory)\n",
            missing.display()
        )
    );
    let out = run(t
        .pycstore()
        .args(["mount", "--source"])
        .arg(&missing)
        .arg(&mnt));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "pycstore: error: the prefix `{}` does not exist\n",
            missing.display()
        )
    );

    let out = run(t.pycstore().args(["mount", "--over"]).arg(&missing));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "pycstore: error: the prefix `{}` does not exist\n",
            missing.display()
        )
    );

    let out = run(t
        .pycstore()
        .current_dir(t.path())
        .args(["mount", "app", "mnt"]));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "error: name the view: to serve `app` with its pycs at `mnt`, run `pycstore mount \
         --source app mnt`; the views are `--source PREFIX MOUNTPOINT` (an overlay of PREFIX \
         at MOUNTPOINT), `--over PREFIX` (an overlay mounted over PREFIX itself) or \
         `--pycache-prefix MOUNTPOINT` (a tree for PYTHONPYCACHEPREFIX)\n\n\
         Usage: pycstore mount [OPTIONS] --source <PREFIX> <MOUNTPOINT>\n       \
         pycstore mount [OPTIONS] --over <PREFIX>\n       \
         pycstore mount [OPTIONS] --pycache-prefix <MOUNTPOINT>\n\n\
         For more information, try '--help'.\n"
    );
    assert!(!is_mounted(&mnt));
}

/// A detached server given a relative `--python` compiles on first access
/// (it leaves its working directory once mounted).
#[test]
fn mount_daemon_with_a_relative_python_compiles() {
    if !fuse_available() {
        return;
    }
    let python = python("3.11");
    let t = TestDir::new();
    app(&t, 1);
    // Not `bin/…`: from `/`, where the server goes, that may exist.
    std::fs::create_dir(t.join("interp")).unwrap();
    std::os::unix::fs::symlink(&python, t.join("interp/py311")).unwrap();
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let log = t.join("mount.log");
    run_ok(
        t.pycstore()
            .current_dir(t.path())
            .args([
                "mount",
                "--daemon",
                "--source",
                "app",
                "mnt",
                "--python",
                "interp/py311",
                "--log",
            ])
            .arg(&log),
    );
    assert!(is_mounted(&mnt));
    let pyc = std::fs::read(mnt.join("__pycache__/mod_0.cpython-311.pyc"));
    run_ok(t.pycstore().arg("unmount").arg(&mnt));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut text = String::new();
    while !text.contains("unmounted") {
        assert!(
            std::time::Instant::now() < deadline,
            "no final report: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let pyc = pyc.unwrap_or_else(|e| panic!("no pyc through the mount ({e}): {text}"));
    assert!(pyc.len() > 16, "{text}");
    assert_eq!(reported(&text, "compiled on first access"), 1, "{text}");
    assert!(!text.contains("warning"), "{text}");
}

/// "entries" is one number in `stats`, `verify`, `export` and `import`.
#[test]
fn entries_mean_the_same_everywhere() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 3);
    link(&t, &python, &app);
    let stats = json(&run_ok(t.pycstore().args(["stats", "--json"])));
    let verify = json(&run_ok(t.pycstore().args(["verify", "--json"])));
    let pack = t.join("pycs.pack");
    let export = json(&run_ok(t.pycstore().args(["export", "--json"]).arg(&pack)));
    let import = json(&run_ok(
        pycstore(&t.join("other"))
            .args(["import", "--json"])
            .arg(&pack),
    ));
    for (what, json) in [
        ("stats", &stats),
        ("verify", &verify),
        ("export", &export),
        ("import", &import),
    ] {
        assert_eq!(json["entries"], 3, "{what}: {json}");
    }
    let out = run_ok(t.pycstore().arg("stats"));
    assert!(
        stdout(&out).contains("\nentries              3\n"),
        "{}",
        stdout(&out)
    );
    let out = run_ok(t.pycstore().arg("verify"));
    assert!(
        stdout(&out).starts_with("checked 3 objects ("),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains(" and 3 index entries: no problems; 0 orphaned objects in "),
        "{}",
        stdout(&out)
    );
}

/// `stats` counts the pycs `link` placed the same before and after `gc`
/// evicted their objects (count and size, in text and JSON), says how much
/// of that the store no longer holds, and `status` keeps calling them from
/// the store, never foreign, through a later `link` too.
#[test]
fn linked_pycs_stay_counted_and_pycstores_after_gc() {
    let python = python("3.11");
    let t = TestDir::new();
    let app = app(&t, 3);
    // Two sources of one body: one object, linked twice.
    t.write("app/same.py", "VALUE = 0\n");
    link(&t, &python, &app);
    let bytes = pyc_bytes(&app);
    let stats = || json(&run_ok(t.pycstore().args(["stats", "--json"])));
    let before = stats();
    assert_eq!(before["linked_pycs"], 4, "{before}");
    assert_eq!(before["logical_bytes"], bytes, "{before}");
    assert_eq!(before["linked_stored_bytes"], bytes, "{before}");
    assert_eq!(before["objects"], 3, "{before}");

    // Evict one object (the least recently used goes first; all are linked):
    // a max size just under what the store holds.
    let disk = before["disk_bytes"].as_u64().unwrap();
    run_ok(
        t.pycstore()
            .args(["gc", "--max-size"])
            .arg((disk - 1).to_string()),
    );
    let some = stats();
    assert_eq!(some["objects"], 2, "{some}");
    assert_eq!(some["linked_pycs"], 4, "{some}");
    assert_eq!(some["logical_bytes"], bytes, "{some}");
    let stored = some["linked_stored_bytes"].as_u64().unwrap();
    assert!(stored < bytes && stored > 0, "{some}");
    let ratio = some["dedup_ratio"].as_f64().unwrap();
    let object_bytes = some["object_bytes"].as_f64().unwrap();
    assert!(
        (ratio - stored as f64 / object_bytes).abs() < 1e-9,
        "{some}"
    );

    // Everything evicted.
    run_ok(t.pycstore().args(["gc", "--max-size", "0"]));
    let none = stats();
    assert_eq!(none["objects"], 0, "{none}");
    assert_eq!(none["linked_pycs"], 4, "{none}");
    assert_eq!(none["logical_bytes"], bytes, "{none}");
    assert_eq!(none["linked_stored_bytes"], 0, "{none}");
    let text = stdout(&run_ok(t.pycstore().arg("stats")));
    assert!(
        text.contains(&format!(
            "\nlinked pycs          4 ({bytes} B as separate files, {bytes} B of them no longer \
             in the store, dedup ratio 0.00)\n"
        )),
        "{text}"
    );
    let counts = status(&t, &python, &app);
    assert_eq!(
        (counts["from_store"].as_u64(), counts["foreign"].as_u64()),
        (Some(4), Some(0)),
        "{counts}"
    );
    let out = run_ok(
        t.pycstore()
            .arg("status")
            .arg("--python")
            .arg(&python)
            .arg(&app),
    );
    assert!(
        stdout(&out).ends_with(
            ": 4 pycs: 4 from the store, 0 foreign, 0 stale, 0 missing (0 do not compile)\n"
        ),
        "{}",
        stdout(&out)
    );

    // Linked again (the store compiles what it lost): the same pycs, the
    // same counts, all stored again. A recompiled pyc may differ from the
    // first compile by a few bytes (marshal's references depend on the
    // interpreter's state), and replaces it: count what is there now.
    link(&t, &python, &app);
    let bytes = pyc_bytes(&app);
    let again = stats();
    assert_eq!(again["linked_pycs"], 4, "{again}");
    assert_eq!(again["logical_bytes"], bytes, "{again}");
    assert_eq!(again["linked_stored_bytes"], bytes, "{again}");
    let counts = status(&t, &python, &app);
    assert_eq!(
        (counts["from_store"].as_u64(), counts["foreign"].as_u64()),
        (Some(4), Some(0)),
        "{counts}"
    );
    let text = stdout(&run_ok(t.pycstore().arg("stats")));
    assert!(
        text.contains(&format!(
            "\nlinked pycs          4 ({bytes} B as separate files, dedup ratio "
        )),
        "{text}"
    );
}
