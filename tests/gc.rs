//! `pycstore gc`: what it evicts and in which order, what it leaves working
//! (prefixes keep importing, the next link compiles what was evicted), and
//! the garbage it always removes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pycstore_store::index::{Index, Writes};
use pycstore_store::objects::ObjectId;

use crate::util::*;

/// Writes app `name`: a package of `modules` modules, all distinct.
fn write_app(t: &TestDir, name: &str, modules: usize) -> PathBuf {
    let imports: String = (0..modules)
        .map(|i| format!("from . import m{i}\n"))
        .collect();
    t.write(
        format!("{name}/{name}/__init__.py"),
        format!("# {name}\n{imports}"),
    );
    for i in 0..modules {
        t.write(
            format!("{name}/{name}/m{i}.py"),
            format!("VALUE = {:?}\n", format!("{name}-{i}")),
        );
    }
    t.join(name)
}

/// The store object a placed pyc came from.
fn object_of(t: &TestDir, pyc: &Path) -> PathBuf {
    let hex = ObjectId::of(&std::fs::read(pyc).unwrap()).to_hex();
    t.store().join("objects-v1").join(&hex[..2]).join(&hex[2..])
}

/// The objects of every pyc of `app`'s package.
fn objects_of(t: &TestDir, app: &Path) -> Vec<PathBuf> {
    pycs_under(app)
        .iter()
        .map(|pyc| object_of(t, &app.join(pyc)))
        .collect()
}

/// Records when each object was last used, as `link` does.
fn set_last_use(t: &TestDir, objects: &[PathBuf], when: u64) {
    let mut index = Index::open(&t.store().join("index-v2")).unwrap();
    let mut writes = Writes::default();
    for object in objects {
        writes.used(&id_of(object), when);
    }
    index.apply(writes).unwrap();
}

fn id_of(object: &Path) -> ObjectId {
    let shard = object
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let rest = object.file_name().unwrap().to_str().unwrap();
    ObjectId::from_hex(&format!("{shard}{rest}")).unwrap()
}

fn disk(objects: &[PathBuf]) -> u64 {
    objects
        .iter()
        .map(|o| std::fs::metadata(o).unwrap().blocks() * 512)
        .sum()
}

fn size(objects: &[PathBuf]) -> u64 {
    objects
        .iter()
        .map(|o| std::fs::metadata(o).unwrap().len())
        .sum()
}

fn link(t: &TestDir, mode: &str, app: &Path) -> serde_json::Value {
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--link-mode", mode, "--python"])
            .arg(python("3.11"))
            .arg(app),
    );
    assert_output!(out, out.status.success(), "link {}", app.display());
    json
}

fn gc(t: &TestDir, args: &[&str]) -> serde_json::Value {
    let (out, json) = link_json(t.pycstore().arg("gc").args(args));
    assert_output!(out, out.status.success(), "gc {args:?}");
    json
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn max_size_evicts_least_recently_used_first_and_linked_objects_last() {
    let t = TestDir::new();
    // `old` and `recent` were copied into their prefixes: evicting their
    // objects frees disk. `linked` is hard linked: evicting frees nothing.
    let old = write_app(&t, "old", 3);
    let recent = write_app(&t, "recent", 3);
    let linked = write_app(&t, "linked", 3);
    link(&t, "copy", &old);
    link(&t, "copy", &recent);
    link(&t, "hardlink", &linked);
    let (o_old, o_recent, o_linked) = (
        objects_of(&t, &old),
        objects_of(&t, &recent),
        objects_of(&t, &linked),
    );
    assert!(o_linked
        .iter()
        .all(|o| std::fs::metadata(o).unwrap().nlink() == 2));
    // The linked objects are the least recently used of all.
    set_last_use(&t, &o_linked, now() - 3000);
    set_last_use(&t, &o_old, now() - 2000);
    set_last_use(&t, &o_recent, now() - 1000);
    let (d_old, d_recent) = (disk(&o_old), disk(&o_recent));
    let total = d_old + d_recent + disk(&o_linked);
    let logical = size(&o_recent) + size(&o_linked);

    // Just over the limit: the least recently used unlinked objects go,
    // not the older linked ones.
    let limit = total - d_old;
    let dry = gc(&t, &["--dry-run", "--max-size", &limit.to_string()]);
    assert_eq!(dry["evicted"], o_old.len(), "{dry}");
    assert!(
        o_old.iter().all(|o| o.exists()),
        "a dry run removed objects"
    );

    let json = gc(&t, &["--max-size", &limit.to_string()]);
    assert_eq!(json["objects_before"], 12, "{json}");
    assert_eq!(json["bytes_before"], total, "{json}");
    assert_eq!(json["evicted"], o_old.len(), "{json}");
    assert_eq!(json["evicted_linked"], 0, "{json}");
    assert_eq!(json["freed_physical"], d_old, "{json}");
    assert_eq!(json["bytes_after"], limit, "{json}");
    // Each pyc has one entry (its flavor; the body record that repeats it
    // is not counted, as in `stats`).
    assert_eq!(json["entries_removed"], o_old.len(), "{json}");
    assert!(o_old.iter().all(|o| !o.exists()));
    assert!(o_recent.iter().chain(&o_linked).all(|o| o.exists()));

    // Nothing is small enough: every unlinked object first, then the
    // linked ones, which free no disk.
    let json = gc(&t, &["--max-size", "0"]);
    assert_eq!(json["evicted"], o_recent.len() + o_linked.len(), "{json}");
    assert_eq!(json["evicted_linked"], o_linked.len(), "{json}");
    assert_eq!(json["freed_physical"], d_recent, "{json}");
    assert_eq!(json["freed_logical"], logical, "{json}");
    assert_eq!(
        (json["objects_after"].as_u64(), json["bytes_after"].as_u64()),
        (Some(0), Some(0)),
        "{json}"
    );

    // The hard linked prefix does not notice: every module from its pyc.
    let log = python_v(
        &python("3.11"),
        &["-c", "import linked"],
        &[("PYTHONPATH", linked.as_os_str())],
    );
    assert_nothing_compiled(&log, &linked, 4);

    // The next link of what was evicted compiles it again.
    let again = t.join("again");
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&old)
            .arg(&again),
    );
    remove_pycache(&again);
    let json = link(&t, "copy", &again);
    assert_eq!(json["compiled"], 4, "{json}");
    let log = python_v(
        &python("3.11"),
        &["-c", "import old"],
        &[("PYTHONPATH", again.as_os_str())],
    );
    assert_nothing_compiled(&log, &again, 4);

    // Humans get one line saying what went and what it freed.
    let out = run_ok(t.pycstore().args(["gc", "--max-size", "1G"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("evicted 0 objects") && stdout.contains("of disk"),
        "{stdout}"
    );
}

#[test]
fn older_than_evicts_objects_unused_since_and_keeps_linked_ones() {
    let t = TestDir::new();
    let stale = write_app(&t, "stale", 1);
    let fresh = write_app(&t, "fresh", 1);
    let linked = write_app(&t, "linked", 1);
    let unrecorded = write_app(&t, "unrecorded", 1);
    for app in [&stale, &fresh, &unrecorded] {
        link(&t, "copy", app);
    }
    link(&t, "hardlink", &linked);
    let forty_days_ago = now() - 40 * 86_400;
    set_last_use(&t, &objects_of(&t, &stale), forty_days_ago);
    set_last_use(&t, &objects_of(&t, &linked), forty_days_ago);
    // Without a use time, the object file's mtime says when it was made.
    let o_unrecorded = objects_of(&t, &unrecorded);
    {
        let mut index = Index::open(&t.store().join("index-v2")).unwrap();
        let mut writes = Writes::default();
        for o in &o_unrecorded {
            writes.forget_use(&id_of(o));
        }
        index.apply(writes).unwrap();
    }
    for o in &o_unrecorded {
        std::fs::File::open(o)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(40 * 86_400))
            .unwrap();
    }

    let json = gc(&t, &["--older-than", "30d"]);
    assert_eq!(json["evicted"], 4, "{json}");
    assert_eq!(json["evicted_linked"], 0, "{json}");
    for o in objects_of(&t, &stale).iter().chain(&o_unrecorded) {
        assert!(!o.exists(), "{} survived", o.display());
    }
    for o in objects_of(&t, &fresh)
        .iter()
        .chain(&objects_of(&t, &linked))
    {
        assert!(o.exists(), "{} was evicted", o.display());
    }
    let json = gc(&t, &["--older-than", "30d"]);
    assert_eq!(json["evicted"], 0, "{json}");
}

#[test]
fn orphans_old_layouts_and_temp_leftovers_always_go() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 2);
    link(&t, "hardlink", &app);
    let store = t.store();
    // An object no entry names (as a crash between writing and recording
    // one leaves behind).
    let orphan = {
        let bytes = b"an object no index entry names";
        let hex = ObjectId::of(bytes).to_hex();
        let path = t.write(
            store.join("objects-v1").join(&hex[..2]).join(&hex[2..]),
            bytes,
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        path
    };
    // Buckets of another layout version. (An index set aside by a repair is
    // kept, and keeps orphans: `verify::gc_keeps_orphans_while_an_index_is_set_aside`.)
    t.write(store.join("objects-v0/ab/cdef"), "old object");
    std::fs::set_permissions(
        store.join("objects-v0/ab/cdef"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    t.write(store.join("index-v0/CURRENT"), "MANIFEST-000001\n");
    t.write(store.join("index-v0.lock"), "");
    // Not pycstore's: left alone.
    t.write(store.join("notes.txt"), "mine");
    t.write(store.join("objects-vintage/x"), "mine");
    // A temp file a killed writer left an hour ago, and one being written.
    let leftover = t.write(store.join("tmp/.pycstore-dead.tmp"), "partial");
    std::fs::File::options()
        .write(true)
        .open(&leftover)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(600))
        .unwrap();
    let writing = t.write(store.join("tmp/.pycstore-live.tmp"), "partial");

    let dry = gc(&t, &["--dry-run"]);
    for (field, n) in [
        ("evicted", 1),
        ("evicted_orphans", 1),
        ("old_layouts_removed", 3),
        ("tmp_removed", 1),
    ] {
        assert_eq!(dry[field], n, "{field}: {dry}");
    }
    assert!(orphan.exists() && store.join("objects-v0").exists() && leftover.exists());

    let json = gc(&t, &[]);
    assert_eq!(json["evicted"], 1, "{json}");
    assert_eq!(json["evicted_orphans"], 1, "{json}");
    assert_eq!(json["entries_removed"], 0, "{json}");
    assert_eq!(json["old_layouts_removed"], 3, "{json}");
    assert_eq!(json["tmp_removed"], 1, "{json}");
    assert!(!orphan.exists());
    for gone in ["objects-v0", "index-v0", "index-v0.lock"] {
        assert!(!store.join(gone).exists(), "{gone} is still there");
    }
    assert!(!leftover.exists());
    assert!(writing.exists(), "removed a temp file being written");
    assert!(store.join("notes.txt").exists() && store.join("objects-vintage/x").exists());
    assert!(objects_of(&t, &app).iter().all(|o| o.exists()));

    let (out, json) = link_json(t.pycstore().arg("verify"));
    assert_output!(out, out.status.success(), "verify after gc");
    assert_eq!(json["orphans"], 0, "{json}");
    let again = link(&t, "hardlink", &app);
    assert_eq!(again["up_to_date"], 3, "{again}");
}

#[test]
fn bad_sizes_and_ages_are_refused() {
    let t = TestDir::new();
    for args in [
        ["--max-size", "12X"],
        ["--older-than", "30"],
        ["--older-than", "3y"],
    ] {
        let out = run(t.pycstore().arg("gc").args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(args[1]) && stderr.contains(args[0]),
            "{stderr}"
        );
    }
    assert!(!t.store().exists(), "a refused gc created the store");
}
