//! Store integrity against other users and damage: a store whose buckets
//! are symlinks or belong to someone else is refused; `verify` finds
//! objects whose owner or mode changed (a `chown -R` of one linked venv)
//! and every recorded pyc that still holds a damaged or exposed inode, and
//! `--repair` takes them out of every prefix; a group store works for every
//! member whatever their umask.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use pycstore_store::objects::ObjectId;

use crate::util::*;

/// Writes package `pkg` of `modules` modules under `dir`.
fn write_pkg(dir: &Path, modules: usize) {
    let imports: String = (0..modules)
        .map(|i| format!("from . import m{i}\n"))
        .collect();
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    std::fs::write(dir.join("pkg/__init__.py"), imports).unwrap();
    for i in 0..modules {
        std::fs::write(
            dir.join(format!("pkg/m{i}.py")),
            format!("VALUE = {i}\n\n\ndef f(x):\n    return x + VALUE\n"),
        )
        .unwrap();
    }
}

/// A venv (no pip) of CPython 3.11 holding package `pkg` in site-packages.
fn venv_with_pkg(t: &TestDir, name: &str, modules: usize) -> PathBuf {
    let venv = t.join(name);
    run_ok(
        Command::new(python("3.11"))
            .args(["-m", "venv", "--without-pip"])
            .arg(&venv),
    );
    write_pkg(&site_packages(&venv), modules);
    venv
}

fn site_packages(venv: &Path) -> PathBuf {
    venv.join("lib/python3.11/site-packages")
}

fn pyc(dir: &Path, module: &str) -> PathBuf {
    dir.join(format!("pkg/__pycache__/{module}.cpython-311.pyc"))
}

/// The store object holding the bytes of `pyc`.
fn object_of(t: &TestDir, pyc: &Path) -> PathBuf {
    let hex = ObjectId::of(&std::fs::read(pyc).unwrap()).to_hex();
    t.store().join("objects-v1").join(&hex[..2]).join(&hex[2..])
}

fn link(t: &TestDir, mode: &str, prefix: &Path, python: Option<&Path>) -> serde_json::Value {
    let mut cmd = t.pycstore();
    cmd.args(["link", "--link-mode", mode]);
    if let Some(python) = python {
        cmd.arg("--python").arg(python);
    }
    let (out, json) = link_json(cmd.arg(prefix));
    assert_output!(out, out.status.success(), "link {}", prefix.display());
    json
}

fn verify(t: &TestDir, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    link_json(t.pycstore().arg("verify").args(args))
}

/// The problems of `kind` in a verify report, by path.
fn problems_of(json: &serde_json::Value, kind: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == kind)
        .map(|p| PathBuf::from(p["path"].as_str().unwrap()))
        .collect();
    paths.sort();
    paths
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `setpriv` as `user` (a name), with that user's groups, running `sh -c
/// SCRIPT` under `umask`; `$1`... are `args`.
fn as_user(user: &str, umask: &str, script: &str, args: &[&Path]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={user}"))
        .arg(format!("--regid={user}"))
        .args(["--init-groups", "--", "sh", "-c"])
        .arg(format!("umask {umask}; {script}"))
        .arg("sh")
        .args(args);
    cmd
}

#[test]
fn a_bucket_that_is_a_symlink_or_belongs_to_another_user_is_refused() {
    let t = TestDir::new();
    write_pkg(&t.join("app"), 2);
    link(&t, "hardlink", &t.join("app"), Some(&python("3.11")));
    let objects = t.store().join("objects-v1");

    // objects-v1 moved into a directory another user owns, a symlink left
    // in its place: that user could swap every object root links.
    let evil = t.join("evil");
    std::fs::create_dir(&evil).unwrap();
    std::fs::rename(&objects, evil.join("objects")).unwrap();
    std::os::unix::fs::symlink(evil.join("objects"), &objects).unwrap();
    run_ok(Command::new("chown").args(["-R", "65534:65534"]).arg(&evil));
    write_pkg(&t.join("other"), 2);
    let out = run(t
        .pycstore()
        .args(["link", "--python"])
        .arg(python("3.11"))
        .arg(t.join("other")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2)
            && stderr.contains(&format!("`{}` is a symlink", objects.display()))
            && stderr.contains("remove the symlink"),
        "a symlinked objects-v1 must be refused"
    );
    assert!(pycs_under(&t.join("other")).is_empty());
    std::fs::remove_file(&objects).unwrap();
    run_ok(Command::new("chown").args(["-R", "0:0"]).arg(&evil));
    std::fs::rename(evil.join("objects"), &objects).unwrap();
    run_ok(t.pycstore().arg("stats"));

    // Each bucket handed to another user is refused, naming it.
    for bucket in ["objects-v1", "tmp", "index-v2", "lock", "index-v2.lock"] {
        let path = t.store().join(bucket);
        std::os::unix::fs::lchown(&path, Some(65534), Some(65534)).unwrap();
        let out = run(t.pycstore().arg("stats"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_output!(
            out,
            out.status.code() == Some(2)
                && stderr.contains(&format!("`{}` belongs to user id 65534", path.display()))
                && stderr.contains("Remove it"),
            "{bucket} owned by nobody must be refused"
        );
        std::os::unix::fs::lchown(&path, Some(0), Some(0)).unwrap();
    }
    run_ok(t.pycstore().arg("stats"));

    // Inside the objects bucket, a shard another user owns is reported and
    // given back by repair.
    let shard = object_of(&t, &pyc(&t.join("app"), "m0"))
        .parent()
        .unwrap()
        .to_path_buf();
    std::os::unix::fs::chown(&shard, Some(65534), Some(65534)).unwrap();
    let (out, json) = verify(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(problems_of(&json, "owner"), vec![shard.clone()], "{json:#}");
    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    let meta = std::fs::metadata(&shard).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o700));
}

/// Whoever holds the store's lock while a command waits for it (in a group
/// store, any member) has all the time they want to swap a bucket for a
/// symlink: the buckets are checked again once the lock is had, and the
/// swapped one refused, before anything is swept, written or linked.
#[test]
fn a_bucket_swapped_while_a_link_waits_for_the_lock_is_refused() {
    use std::io::Read;
    let t = TestDir::new();
    write_pkg(&t.join("app"), 2);
    link(&t, "hardlink", &t.join("app"), Some(&python("3.11")));
    let elsewhere = t.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("old"), "").unwrap();
    // Held exclusive, as `gc` holds it.
    let lock = std::fs::File::options()
        .read(true)
        .write(true)
        .open(t.store().join("lock"))
        .unwrap();
    lock.lock().unwrap();
    write_pkg(&t.join("other"), 2);
    let mut child = t
        .pycstore()
        .args(["link", "--python"])
        .arg(python("3.11"))
        .arg(t.join("other"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until it says it waits.
    let mut stderr = child.stderr.take().unwrap();
    let mut said = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&said).contains("waiting for") {
        assert_eq!(
            stderr.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&said)
        );
        said.push(byte[0]);
    }
    let tmp = t.store().join("tmp");
    std::fs::rename(&tmp, t.join("tmp-was")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &tmp).unwrap();
    lock.unlock().unwrap();
    stderr.read_to_end(&mut said).unwrap();
    let status = child.wait().unwrap();
    let said = String::from_utf8_lossy(&said);
    assert!(
        status.code() == Some(2) && said.contains(&format!("`{}` is a symlink", tmp.display())),
        "{status:?}: {said}"
    );
    assert!(elsewhere.join("old").exists());
    assert!(pycs_under(&t.join("other")).is_empty());
}

/// The issue's attack: root links two venvs from one store; a `chown -R
/// app` of one of them (a common Dockerfile step) hands the shared objects
/// to `app`, who could then change root's other venv through them.
#[test]
fn a_chown_of_one_linked_prefix_is_found_and_repaired_in_every_prefix() {
    let t = TestDir::new();
    set_mode(t.path(), 0o755);
    let python = python("3.11");
    let (a, b) = (t.join("a"), t.join("b"));
    write_pkg(&a, 3);
    write_pkg(&b, 3);
    link(&t, "hardlink", &a, Some(&python));
    assert_eq!(link(&t, "hardlink", &b, Some(&python))["compiled"], 0);
    let pycs: Vec<String> = ["__init__", "m0", "m1", "m2"]
        .iter()
        .map(|m| m.to_string())
        .collect();
    let objects: Vec<PathBuf> = pycs.iter().map(|m| object_of(&t, &pyc(&b, m))).collect();

    run_ok(Command::new("chown").args(["-R", "65534:65534"]).arg(&a));
    // The attack: nobody owns b's pycs now, so can make them writable.
    let as_nobody_chmod = |path: &Path, mode: &str| {
        run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(["chmod", mode])
            .arg(path))
    };
    assert!(as_nobody_chmod(&pyc(&b, "m0"), "0444").status.success());

    let (out, json) = verify(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(json["bad_owner"], 4, "{json:#}");
    assert_eq!(json["exposed_links"], 8, "{json:#}");
    let mut expected = objects.clone();
    expected.sort();
    assert_eq!(problems_of(&json, "owner"), expected, "{json:#}");
    let exposed = problems_of(&json, "exposed-link");
    for m in &pycs {
        assert!(exposed.contains(&pyc(&a, m)) && exposed.contains(&pyc(&b, m)));
    }

    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["repairs"]["owners_fixed"], 4, "{json:#}");
    assert_eq!(json["repairs"]["links_removed"], 8, "{json:#}");
    for object in &objects {
        let meta = std::fs::symlink_metadata(object).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777, meta.nlink()),
            (0, 0, 0o444, 1),
            "{}",
            object.display()
        );
    }
    assert!(pycs_under(&b).is_empty(), "{:?}", pycs_under(&b));

    // Linking b again places the fresh inodes, which nobody cannot write;
    // b imports from them.
    assert_eq!(link(&t, "hardlink", &b, Some(&python))["compiled"], 0);
    for m in &pycs {
        let meta = std::fs::metadata(pyc(&b, m)).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o444));
        let out = as_nobody_chmod(&pyc(&b, m), "0644");
        assert!(
            !out.status.success(),
            "nobody can make b's {m} pyc writable"
        );
    }
    let log = python_v(
        &python,
        &["-c", "import pkg"],
        &[("PYTHONPATH", b.as_os_str())],
    );
    assert_nothing_compiled(&log, &b, 4);
    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify at the end: {json:#}");
}

/// The issue's damage: an object truncated in place stays hard linked in
/// every prefix linked before, where imports fail; once the store holds good
/// bytes under its name again (a pack imported, a compile written), nothing
/// found those prefixes.
#[test]
fn a_truncated_object_is_taken_out_of_every_prefix_that_holds_it() {
    let t = TestDir::new();
    let venv1 = venv_with_pkg(&t, "venv1", 3);
    let venv3 = venv_with_pkg(&t, "venv3", 3);
    link(&t, "hardlink", &venv1, None);
    assert_eq!(link(&t, "hardlink", &venv3, None)["compiled"], 0);
    let pack = t.join("store.pack");
    run_ok(t.pycstore().arg("export").arg(&pack));
    let (sp1, sp3) = (site_packages(&venv1), site_packages(&venv3));
    let object = object_of(&t, &pyc(&sp1, "m1"));
    set_mode(&object, 0o644);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&object)
        .unwrap()
        .set_len(30)
        .unwrap();
    set_mode(&object, 0o444);
    let log = python_v(&venv1.join("bin/python"), &["-c", "import pkg"], &[]);
    assert!(!log.output.status.success(), "the damage shows: {log:?}");

    // Importing the pack writes the object again: the store is whole, the
    // earlier prefixes still hold the truncated inode.
    run_ok(t.pycstore().arg("import").arg(&pack));
    assert_eq!(std::fs::metadata(pyc(&sp1, "m1")).unwrap().len(), 30);
    assert!(std::fs::metadata(&object).unwrap().len() > 30);

    let (out, json) = verify(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(
        problems_of(&json, "damaged-link"),
        [pyc(&sp1, "m1"), pyc(&sp3, "m1")],
        "{json:#}"
    );
    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["repairs"]["links_removed"], 2, "{json:#}");
    assert!(!pyc(&sp1, "m1").exists() && !pyc(&sp3, "m1").exists());

    // Python imports from the venv again (compiling the one pyc removed).
    let venv_python = venv1.join("bin/python");
    let log = python_v(&venv_python, &["-c", "import pkg"], &[]);
    let stderr = String::from_utf8_lossy(&log.output.stderr);
    assert_output!(
        log.output,
        log.output.status.success()
            && !stderr.contains("EOFError")
            && !stderr.contains("bad marshal"),
        "import pkg in venv1 after repair"
    );
    // And `link` puts the store's pyc back.
    let json = link(&t, "hardlink", &venv1, None);
    assert_eq!(json["compiled"], 0, "{json}");
    let placed = std::fs::read(pyc(&sp1, "m1")).unwrap();
    assert_eq!(
        std::fs::metadata(pyc(&sp1, "m1")).unwrap().ino(),
        std::fs::metadata(object_of(&t, &pyc(&sp1, "m1")))
            .unwrap()
            .ino()
    );
    assert!(placed.len() > 30);
    let log = python_v(&venv_python, &["-c", "import pkg"], &[]);
    assert_nothing_compiled(&log, &sp1, 4);
    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify at the end: {json:#}");
}

/// Makes group `group` and users `users` in it (once per machine).
fn ensure_users(group: &str, users: &[&str]) {
    if !run(Command::new("getent").args(["group", group]))
        .status
        .success()
    {
        // Another test process may create it meanwhile: -f.
        run_ok(Command::new("groupadd").args(["-f", group]));
    }
    for user in users {
        if !run(Command::new("id").arg(user)).status.success() {
            let out = run(Command::new("useradd")
                .args(["-M", "-U", "-s", "/bin/sh", "-G", group])
                .arg(user));
            // Losing a race with another test process is fine.
            assert!(
                out.status.success() || run(Command::new("id").arg(user)).status.success(),
                "{out:?}"
            );
        }
    }
}

/// Two members of a group share one store: A creates it under umask 077,
/// B (umask 022) links from it with no compile, both import with no
/// recompile, and `verify` passes as either.
#[test]
fn a_group_store_works_for_every_member_under_any_umask() {
    let t = TestDir::new();
    set_mode(t.path(), 0o755);
    ensure_users("pycstore-grp", &["pycstore-a", "pycstore-b"]);
    // The binary lives under /root, which the members cannot enter.
    let bin = t.join("pycstore");
    std::fs::copy(env!("CARGO_BIN_EXE_pycstore"), &bin).unwrap();
    set_mode(&bin, 0o755);
    let python = PathBuf::from("/usr/bin/python3.11");
    // A creates the store, in a directory of theirs.
    let store = t.join("a-home/store");
    std::fs::create_dir(t.join("a-home")).unwrap();
    run_ok(
        Command::new("chown")
            .arg("pycstore-a:")
            .arg(t.join("a-home")),
    );
    let (a, b) = (t.join("a"), t.join("b"));
    write_pkg(&a, 4);
    write_pkg(&b, 4);
    run_ok(Command::new("chown").args(["-R", "pycstore-a:"]).arg(&a));
    run_ok(Command::new("chown").args(["-R", "pycstore-b:"]).arg(&b));
    let pycstore = |user: &str, umask: &str, args: &str, prefix: &Path| {
        let out = run(as_user(
            user,
            umask,
            &format!("exec \"$1\" --store \"$2\" {args} \"$3\""),
            &[&bin, &store, prefix],
        )
        .env_remove("PYCSTORE_DIR"));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!("{user}: pycstore {args}: {out:?}");
        });
        (out, json)
    };

    let link_args = format!(
        "--shared-group pycstore-grp link --json --python {}",
        python.display()
    );
    let (out, json) = pycstore("pycstore-a", "077", &link_args, &a);
    assert_output!(out, out.status.success(), "A links: {json}");
    assert_eq!(json["compiled"], 5, "{json}");
    for (path, mode) in [
        (store.clone(), 0o2770),
        (store.join("objects-v1"), 0o2770),
        (store.join("tmp"), 0o2770),
        (store.join("index-v2"), 0o2770),
        (store.join("lock"), 0o660),
        (store.join("index-v2.lock"), 0o660),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            meta.mode() & 0o7777,
            mode,
            "{} under umask 077",
            path.display()
        );
    }

    let (out, json) = pycstore("pycstore-b", "022", &link_args, &b);
    assert_output!(out, out.status.success(), "B links: {json}");
    assert_eq!(
        (json["compiled"].as_u64(), json["hits"].as_u64()),
        (Some(0), Some(5)),
        "{json}"
    );

    for (user, prefix) in [("pycstore-a", &a), ("pycstore-b", &b)] {
        let out = run(as_user(
            user,
            "022",
            "cd / && PYTHONPATH=\"$2\" exec \"$1\" -v -c 'import pkg'",
            &[&python, prefix],
        )
        .env_remove("PYTHONDONTWRITEBYTECODE"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let root = prefix.to_str().unwrap();
        let from_pyc = stderr
            .lines()
            .filter(|l| l.starts_with(&format!("# code object from '{root}")))
            .count();
        let compiled = stderr
            .lines()
            .filter(|l| l.starts_with(&format!("# code object from {root}")))
            .count();
        assert_output!(
            out,
            out.status.success() && from_pyc == 5 && compiled == 0,
            "{user} imports pkg: {from_pyc} from pycs, {compiled} compiled"
        );
    }
    // Root links a tree of the group from the store: the objects A wrote
    // stay A's, who could make one writable again, so root's pycs get
    // their own inodes instead of A's (the kernel would not stop root).
    let r = t.join("r");
    write_pkg(&r, 4);
    run_ok(
        Command::new("chown")
            .args(["-R", "root:pycstore-grp"])
            .arg(&r),
    );
    // Root, with the group among its groups (as a CI runner's root would
    // be, to use the runners' store).
    let out = run(Command::new("setpriv")
        .args(["--groups", "pycstore-grp", "--"])
        .arg(&bin)
        .arg("--store")
        .arg(&store)
        .env_remove("PYCSTORE_DIR")
        .env("PYCSTORE_CONFIG", "/dev/null")
        .args(["link", "--json", "--python"])
        .arg(&python)
        .arg(&r));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_output!(
        out,
        out.status.success() && json["compiled"] == 0,
        "root links from the group store: {json}"
    );
    let hex = ObjectId::of(&std::fs::read(pyc(&a, "m0")).unwrap()).to_hex();
    let object =
        std::fs::metadata(store.join("objects-v1").join(&hex[..2]).join(&hex[2..])).unwrap();
    let placed = std::fs::metadata(pyc(&r, "m0")).unwrap();
    let a_uid =
        String::from_utf8(run_ok(Command::new("id").args(["-u", "pycstore-a"])).stdout).unwrap();
    assert_eq!(object.uid().to_string(), a_uid.trim());
    assert_ne!(
        (placed.dev(), placed.ino()),
        (object.dev(), object.ino()),
        "root hard linked an object pycstore-a owns"
    );
    for user in ["pycstore-a", "pycstore-b"] {
        let out = run(&mut as_user(
            user,
            "022",
            "exec \"$1\" --store \"$2\" verify --json",
            &[&bin, &store],
        ));
        assert_output!(out, out.status.success(), "verify as {user}");
    }
}
