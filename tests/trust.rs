//! Interpreter trust: root (or anyone with a shared store) does not run an
//! interpreter that another user can change, nothing of a prefix runs while
//! its interpreter is probed or compiles, and what an interpreter run under
//! `--trust-python` compiled is never served to another interpreter.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// The unprivileged user that owns the hostile prefixes.
const NOBODY: u32 = 65534;

/// A directory of `t` owned by the unprivileged user, as a home directory
/// would be (the test dir itself is made traversable for them).
fn user_home(t: &TestDir) -> PathBuf {
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = t.join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    home
}

/// Runs `sh -c script` as the unprivileged user.
fn as_user(script: &str) {
    run_ok(
        Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );
}

/// A fake interpreter: it answers the probe as the real `/usr/bin/python3.11`
/// would, and compiles every source to `print("INJECTED")`. Running at all
/// leaves `marker`.
const FAKE: &str = r#"
import sys
args = sys.argv[1:]
code = args[args.index("-c") + 1]
namespace = {"__name__": "__main__"}
if "pycstore-worker" in code:
    real_compile = compile
    def evil(source, name, mode, **kw):
        return real_compile(b"print('INJECTED')\n", name, mode, **kw)
    namespace["compile"] = evil
exec(code, namespace)
"#;

fn stats(json: &serde_json::Value) -> (u64, u64) {
    (
        json["compiled"].as_u64().unwrap_or(u64::MAX),
        json["hits"].as_u64().unwrap_or(u64::MAX),
    )
}

/// A venv made by root without pip, with `mod.py` in its site-packages.
fn root_venv(python: &Path, dest: &Path) -> PathBuf {
    run_ok(
        Command::new(python)
            .args(["-m", "venv", "--without-pip"])
            .arg(dest),
    );
    let site = site_packages(dest);
    std::fs::write(site.join("mod.py"), "VALUE = 42\n").unwrap();
    site
}

fn site_packages(venv: &Path) -> PathBuf {
    let lib = venv.join("lib");
    let version = std::fs::read_dir(&lib).unwrap().flatten().next().unwrap();
    version.path().join("site-packages")
}

#[test]
fn a_fake_interpreter_of_another_user_is_not_run_and_its_bytecode_serves_nobody_else() {
    let t = TestDir::new();
    let home = user_home(&t);
    let marker = t.join("fake-ran");
    let venv = home.join("venv");
    // The user's venv: a script as bin/python3, and a module whose source is
    // the same as in root's venv below.
    as_user(&format!(
        "mkdir -p {venv}/bin {venv}/lib/python3.11/site-packages && \
         printf '%s' '{fake}' > {home}/fake.py && \
         printf '#!/bin/sh\\ntouch {marker}\\nexec /usr/bin/python3.11 -I -S {home}/fake.py \"$@\"\\n' \
           > {venv}/bin/python3 && chmod 755 {venv}/bin/python3 && \
         printf 'VALUE = 42\\n' > {venv}/lib/python3.11/site-packages/mod.py",
        venv = venv.display(),
        home = home.display(),
        marker = marker.display(),
        fake = FAKE.replace('\'', "'\\''"),
    ));
    let python3 = venv.join("bin/python3");

    // Root refuses to run it: exit 2, naming the interpreter and the flag.
    let out = run(t.pycstore().arg("link").arg(&venv));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2)
            && stderr.contains(&python3.display().to_string())
            && stderr.contains("--trust-python"),
        "linking a venv of user {NOBODY} as root must be refused naming `{}` and --trust-python",
        python3.display()
    );
    assert!(!marker.exists(), "the fake interpreter ran as root");

    // With the override it runs, and what it compiled is what its own
    // prefix gets (the attack is real: a real 3.11 importing from there
    // runs the injected code).
    let (out, json) = link_json(t.pycstore().args(["--trust-python", "link"]).arg(&venv));
    assert_output!(
        out,
        out.status.success(),
        "link --trust-python failed: {json}"
    );
    assert!(
        marker.exists(),
        "--trust-python did not run the interpreter"
    );
    assert_eq!(stats(&json).0, 1, "{json}");
    let python311 = python("3.11");
    let user_site = venv.join("lib/python3.11/site-packages");
    let log = python_v(
        &python311,
        &["-c", "import mod"],
        &[("PYTHONPATH", user_site.as_os_str())],
    );
    assert_output!(
        log.output,
        String::from_utf8_lossy(&log.output.stdout).contains("INJECTED"),
        "the fake interpreter's bytecode should be in its own prefix"
    );

    // Root's venv of a real 3.11 (same magic number) with the same source:
    // compiled for it, never served the fake's object.
    let victim = t.join("victim");
    let victim_site = root_venv(&python311, &victim);
    let (out, json) = link_json(t.pycstore().arg("link").arg(&victim));
    assert_output!(out, out.status.success(), "link failed: {json}");
    assert_eq!(stats(&json), (1, 0), "{json}");
    let log = python_v(
        &victim.join("bin/python3"),
        &["-c", "import mod; print(mod.VALUE)"],
        &[],
    );
    let stdout = String::from_utf8_lossy(&log.output.stdout);
    assert_output!(
        log.output,
        stdout.trim() == "42",
        "root's venv must import its own module, not the injected one"
    );
    assert_nothing_compiled(&log, &victim_site, 1);

    // The same holds with the override given through the environment, and
    // the store's entries stay apart on the next run too.
    let (out, json) = link_json(
        t.pycstore()
            .env("PYCSTORE_TRUST_PYTHON", "true")
            .arg("link")
            .arg(&venv),
    );
    assert_output!(out, out.status.success(), "link failed: {json}");
    assert_eq!(stats(&json).0, 0, "{json}");
}

#[test]
fn a_real_venv_of_another_user_is_refused_and_its_base_interpreter_is_not() {
    let t = TestDir::new();
    let home = user_home(&t);
    let venv = home.join("venv");
    let marker = t.join("pth-ran");
    as_user(&format!(
        "/usr/bin/python3.11 -m venv --without-pip {venv} && \
         echo 'import os; open(\"{marker}\", \"w\").close()' \
           > {venv}/lib/python3.11/site-packages/evil.pth && \
         echo 'VALUE = 42' > {venv}/lib/python3.11/site-packages/mod.py",
        venv = venv.display(),
        marker = marker.display(),
    ));
    // bin/python3 is a symlink to /usr/bin/python3.11 that its owner can
    // replace at any moment, and pyvenv.cfg chooses the standard library.
    let out = run(t.pycstore().arg("link").arg(&venv));
    assert_output!(
        out,
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("--trust-python"),
        "a venv of user {NOBODY} must be refused"
    );
    // Its base interpreter, named explicitly, is root's and safe to run;
    // the venv's .pth never runs.
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--python", "/usr/bin/python3.11"])
            .arg(&venv),
    );
    assert_output!(out, out.status.success(), "link failed: {json}");
    assert_eq!(stats(&json).0, 1, "{json}");
    assert!(!marker.exists(), "the venv's .pth file ran");
}

#[test]
fn pth_files_and_sitecustomize_of_a_prefix_never_run() {
    let t = TestDir::new();
    for version in ["3.8", "3.12", "pypy3.9"] {
        let venv = t.join(format!("venv-{version}"));
        let site = root_venv(&python(version), &venv);
        let marker = t.join(format!("ran-{version}"));
        std::fs::write(
            site.join("evil.pth"),
            format!("import os; open({marker:?}, 'a').write('pth\\n')\n"),
        )
        .unwrap();
        std::fs::write(
            site.join("sitecustomize.py"),
            format!("open({marker:?}, 'a').write('sitecustomize\\n')\n"),
        )
        .unwrap();
        let (out, json) = link_json(t.pycstore().arg("link").arg(&venv));
        assert_output!(out, out.status.success(), "link {version} failed: {json}");
        assert_eq!(stats(&json).0, 2, "{version}: {json}");
        assert!(
            !marker.exists(),
            "{version}: the prefix's code ran while linking: {}",
            std::fs::read_to_string(&marker).unwrap_or_default()
        );
        // The pycs went where the venv's own interpreter looks.
        std::fs::remove_file(site.join("evil.pth")).unwrap();
        std::fs::remove_file(site.join("sitecustomize.py")).unwrap();
        let log = python_v(&venv.join("bin/python3"), &["-c", "import mod"], &[]);
        assert_nothing_compiled(&log, &site, 1);
    }
}

#[test]
fn a_cached_probe_does_not_let_an_interpreter_others_now_own_run() {
    let t = TestDir::new();
    let venv = t.join("venv");
    root_venv(&python("3.11"), &venv);
    let (out, json) = link_json(t.pycstore().arg("link").arg(&venv));
    assert_output!(out, out.status.success(), "link failed: {json}");
    // The venv is handed to the user: the probe cached while root owned it
    // must not vouch for it now.
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{NOBODY}"))
            .arg(&venv),
    );
    let out = run(t.pycstore().arg("link").arg(&venv));
    assert_output!(
        out,
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("--trust-python"),
        "a cached probe let an interpreter of user {NOBODY} run"
    );
}
