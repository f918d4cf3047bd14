//! `pycstore verify [--repair]`: damage to objects and to the index is
//! found, reported per file, repaired, and after the repair `link` puts
//! good pycs everywhere again; `link` never places a damaged object.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pycstore_store::objects::ObjectId;

use crate::util::*;

/// Writes app `name`: a package of `modules` distinct modules.
fn write_app(t: &TestDir, name: &str, modules: usize) -> PathBuf {
    let imports: String = (0..modules)
        .map(|i| format!("from . import m{i}\n"))
        .collect();
    t.write(
        format!("{name}/pkg/__init__.py"),
        format!("# {name}\n{imports}"),
    );
    for i in 0..modules {
        t.write(
            format!("{name}/pkg/m{i}.py"),
            format!("VALUE = {i}\n\n\ndef f(x):\n    return x + VALUE\n"),
        );
    }
    t.join(name)
}

/// A fresh prefix with the sources of `app` and no pycs.
fn copy_sources(t: &TestDir, app: &Path, name: &str) -> PathBuf {
    let dest = t.join(name);
    run_ok(Command::new("cp").arg("-a").arg(app).arg(&dest));
    remove_pycache(&dest);
    dest
}

fn pyc(app: &Path, module: &str) -> PathBuf {
    app.join(format!("pkg/__pycache__/{module}.cpython-311.pyc"))
}

/// The store object a pyc was placed from.
fn object_of(t: &TestDir, pyc: &Path) -> PathBuf {
    let hex = ObjectId::of(&std::fs::read(pyc).unwrap()).to_hex();
    t.store().join("objects-v1").join(&hex[..2]).join(&hex[2..])
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Changes one bit of `path` in place (as a failing disk would), past the
/// header, keeping its size and mode.
fn flip_a_bit(path: &Path, at: u64) {
    set_mode(path, 0o644);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut file, &mut byte).unwrap();
    byte[0] ^= 0x10;
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&byte).unwrap();
    drop(file);
    set_mode(path, 0o444);
}

fn truncate(path: &Path, len: u64) {
    set_mode(path, 0o644);
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
    set_mode(path, 0o444);
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

fn verify(t: &TestDir, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    link_json(t.pycstore().arg("verify").args(args))
}

fn assert_imports(app: &Path, modules: usize) {
    let log = python_v(
        &python("3.11"),
        &["-c", "import pkg"],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, app, modules + 1);
}

fn problem<'a>(json: &'a serde_json::Value, path: &Path) -> &'a serde_json::Value {
    json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == path.to_str().unwrap())
        .unwrap_or_else(|| panic!("no problem reported for {}: {json:#}", path.display()))
}

#[test]
fn a_clean_store_verifies() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 3);
    link(&t, "hardlink", &app);
    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify of a clean store");
    assert_eq!(json["objects"], 4, "{json}");
    assert_eq!(json["entries"], 8, "{json}");
    assert_eq!(json["orphans"], 0, "{json}");
    assert_eq!(json["index"], "ok", "{json}");
    assert_eq!(json["problems"], serde_json::json!([]), "{json}");
    let out = run_ok(t.pycstore().arg("verify"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("checked 4 objects") && stdout.contains("no problems"),
        "{stdout}"
    );
}

#[test]
fn damaged_objects_are_found_and_repaired_and_link_then_puts_good_pycs_back() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 5);
    link(&t, "hardlink", &app);
    let objects: Vec<PathBuf> = (0..5)
        .map(|i| object_of(&t, &pyc(&app, &format!("m{i}"))))
        .collect();
    let (_, before) = verify(&t, &[]);

    // m0: a flipped bit. m1: truncated. m2: writable. m3: gone. Both m0 and
    // m1 are hard linked into `app`, so its pycs share the damage.
    flip_a_bit(&objects[0], 40);
    truncate(&objects[1], 30);
    set_mode(&objects[2], 0o664);
    std::fs::remove_file(&objects[3]).unwrap();
    let orphan = {
        // A loadable pyc no index entry names.
        let mut bytes = std::fs::read(pyc(&app, "m4")).unwrap();
        bytes[8] ^= 0x01;
        let hex = ObjectId::of(&bytes).to_hex();
        let path = t.write(
            t.store().join("objects-v1").join(&hex[..2]).join(&hex[2..]),
            &bytes,
        );
        set_mode(&path, 0o444);
        path
    };

    let (out, json) = verify(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    for (field, n) in [
        ("corrupt", 2),
        ("bad_permissions", 1),
        ("missing_objects", 1),
        ("damaged_links", 2),
        ("orphans", 1),
        ("strays", 0),
    ] {
        assert_eq!(json[field], n, "{field}: {json:#}");
    }
    assert_eq!(problem(&json, &objects[0])["kind"], "corrupt");
    let truncated = problem(&json, &objects[1]);
    assert!(
        truncated["message"].as_str().unwrap().contains("truncated"),
        "{truncated}"
    );
    assert_eq!(problem(&json, &objects[2])["kind"], "permissions");
    assert_eq!(problem(&json, &objects[3])["kind"], "missing-object");
    assert_eq!(problem(&json, &pyc(&app, "m0"))["kind"], "damaged-link");
    assert_eq!(problem(&json, &pyc(&app, "m1"))["kind"], "damaged-link");
    assert!(json["repairs"].is_null(), "{json}");

    // Humans get one line per problem naming the file, and the way out.
    let out = run(t.pycstore().arg("verify"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for path in objects[..4].iter() {
        assert!(
            stderr.contains(&format!("pycstore: {}: ", path.display())),
            "{stderr}"
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pycstore verify --repair"), "{stdout}");

    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    let repairs = &json["repairs"];
    assert_eq!(repairs["objects_removed"], 2, "{json:#}");
    assert_eq!(repairs["orphans_removed"], 1, "{json:#}");
    assert_eq!(repairs["permissions_fixed"], 1, "{json:#}");
    assert_eq!(repairs["links_removed"], 2, "{json:#}");
    assert!(json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["repaired"] == true));
    assert!(!orphan.exists());
    assert!(!pyc(&app, "m0").exists() && !pyc(&app, "m1").exists());

    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify after repair");
    assert_eq!(json["problems"], serde_json::json!([]), "{json:#}");
    assert_eq!(json["orphans"], 0, "{json:#}");
    assert_eq!(
        json["entries"].as_u64().unwrap(),
        before["entries"].as_u64().unwrap() - repairs["entries_removed"].as_u64().unwrap(),
        "{json:#}"
    );

    // A fresh prefix compiles what was dropped and links the rest.
    let fresh = copy_sources(&t, &app, "fresh");
    let json = link(&t, "hardlink", &fresh);
    assert_eq!(
        (json["compiled"].as_u64(), json["hits"].as_u64()),
        (Some(3), Some(3)),
        "{json}"
    );
    assert_imports(&fresh, 5);
    // The damaged prefix gets good pycs back, all from the store.
    let json = link(&t, "hardlink", &app);
    assert_eq!(json["compiled"], 0, "{json}");
    assert_imports(&app, 5);
    let (out, _) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify at the end");
}

#[test]
fn link_never_places_an_object_whose_size_or_header_is_wrong() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 2);
    link(&t, "copy", &app);
    truncate(&object_of(&t, &pyc(&app, "m0")), 100);
    flip_a_bit(&object_of(&t, &pyc(&app, "m1")), 9);

    let fresh = copy_sources(&t, &app, "fresh");
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--link-mode", "copy", "--python"])
            .arg(python("3.11"))
            .arg(&fresh),
    );
    assert_output!(out, out.status.success(), "link with damaged objects");
    assert_eq!(json["compiled"], 2, "{json}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pycstore verify"), "{stderr}");
    assert_imports(&fresh, 2);
    // Linking around damage does not hide it.
    let (out, json) = verify(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(json["corrupt"], 2, "{json:#}");
}

/// Writes garbage over RocksDB's `CURRENT` and `MANIFEST-*` files.
fn damage_index(index: &Path) {
    let mut damaged = 0;
    for entry in std::fs::read_dir(index).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "CURRENT" || name.starts_with("MANIFEST-") {
            std::fs::write(entry.path(), b"\x00garbage\xff").unwrap();
            damaged += 1;
        }
    }
    assert!(
        damaged >= 2,
        "no CURRENT or MANIFEST in {}",
        index.display()
    );
}

#[test]
fn a_damaged_index_is_a_clear_error_and_verify_repair_recovers() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 3);
    link(&t, "hardlink", &app);
    let index = t.store().join("index-v1");
    damage_index(&index);

    let other = copy_sources(&t, &app, "other");
    let out = run(t
        .pycstore()
        .args(["link", "--python"])
        .arg(python("3.11"))
        .arg(&other));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&index.display().to_string())
            && stderr.contains("pycstore verify --repair"),
        "{stderr}"
    );

    let (out, json) = verify(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(json["index"], "damaged", "{json:#}");
    assert_eq!(problem(&json, &index)["kind"], "index");
    assert_eq!(
        json["objects"], 4,
        "the objects are still checked: {json:#}"
    );

    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["index"], "repaired", "{json:#}");
    assert_eq!(json["objects"], 4, "{json:#}");

    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify after repair: {json:#}");
    let json = link(&t, "hardlink", &other);
    assert_eq!(json["failed"], 0, "{json}");
    assert_imports(&other, 3);
}

#[test]
fn an_index_beyond_repair_is_set_aside_and_started_afresh() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 3);
    link(&t, "hardlink", &app);
    let index = t.store().join("index-v1");
    // Not even a directory: RocksDB's repair cannot help.
    std::fs::remove_dir_all(&index).unwrap();
    std::fs::write(&index, "not a database").unwrap();

    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["index"], "rebuilt", "{json:#}");
    let aside = PathBuf::from(json["index_moved_to"].as_str().unwrap());
    assert_eq!(std::fs::read(&aside).unwrap(), b"not a database");
    // Objects are kept; nothing names them until the next link.
    assert_eq!(
        (json["objects"].as_u64(), json["orphans"].as_u64()),
        (Some(4), Some(4)),
        "{json:#}"
    );
    let stdout = {
        let out = run_ok(t.pycstore().arg("verify"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(stdout.contains("4 orphaned objects"), "{stdout}");

    // Linking the prefix again compiles (the entries were lost), finds the
    // same bytes in the store and records them again.
    let json = link(&t, "hardlink", &app);
    assert_eq!(json["failed"], 0, "{json}");
    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "{json:#}");
    assert_eq!(
        json["orphans"], 0,
        "the link named the kept objects again: {json:#}"
    );
    assert_eq!(json["entries"], 8, "{json:#}");
    let other = copy_sources(&t, &app, "other");
    link(&t, "hardlink", &other);
    assert_imports(&other, 3);

    // The set-aside index is garbage for gc.
    let (out, json) = link_json(t.pycstore().arg("gc"));
    assert_output!(out, out.status.success(), "gc");
    assert_eq!(json["old_layouts"][0], aside.to_str().unwrap(), "{json:#}");
    assert!(!aside.exists());
}

#[test]
fn an_object_python_cannot_load_is_reported_and_after_repair_link_compiles_it() {
    use pycstore_store::index::{Family, Writes};
    let t = TestDir::new();
    let app = write_app(&t, "app", 2);
    link(&t, "copy", &app);
    // m0's entries now name an object made of its header, the code type
    // byte and garbage, stored whole (its name is its hash), as a
    // pycache-prefix mount once ingested.
    let good = std::fs::read(pyc(&app, "m0")).unwrap();
    let good_id = ObjectId::of(&good);
    let mut garbage = good[..16].to_vec();
    garbage.extend_from_slice(b"c\xde\xad\xbe\xef and garbage where the code object should be");
    let bad = {
        let store = pycstore_store::Store::open(&t.store()).unwrap();
        let bad = store.objects.put(&garbage).unwrap();
        let mut index = store.index().unwrap();
        let mut writes = Writes::default();
        let mut value = bad.0.to_vec();
        value.extend_from_slice(&(garbage.len() as u64).to_le_bytes());
        value.extend_from_slice(&garbage[..16]);
        for (key, old) in index.scan(Family::Entries, b"").unwrap() {
            if old[..32] == good_id.0 {
                writes.put(Family::Entries, &key, &value);
            }
        }
        assert!(!writes.is_empty());
        index.apply(writes).unwrap();
        bad
    };
    let hex = bad.to_hex();
    let bad_path = t.store().join("objects-v1").join(&hex[..2]).join(&hex[2..]);

    let (out, json) = verify(&t, &[]);
    assert_output!(
        out,
        out.status.code() == Some(1),
        "verify must fail: {json}"
    );
    let found = problem(&json, &bad_path);
    assert_eq!(found["kind"], "corrupt", "{found}");
    let message = found["message"].as_str().unwrap();
    assert!(
        message.contains("not a loadable CPython 3.11 code object"),
        "{message}"
    );

    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "repair: {json}");
    assert!(!bad_path.exists());
    let copy = copy_sources(&t, &app, "copy");
    assert_eq!(link(&t, "copy", &copy)["compiled"], 1);
    assert_imports(&copy, 2);
}
