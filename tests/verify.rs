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
    assert_eq!(json["entries"], 4, "{json}");
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

    // m0: a flipped bit. m1: truncated. m2: writable. m3: gone. m0, m1 and
    // m2 are hard linked into `app`, so its pycs share the damage (m2's is
    // exposed to whoever can write it).
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
        ("exposed_links", 1),
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
    assert_eq!(repairs["links_removed"], 3, "{json:#}");
    assert!(json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["repaired"] == true));
    assert!(!orphan.exists());
    assert!(!pyc(&app, "m0").exists() && !pyc(&app, "m1").exists());
    assert!(!pyc(&app, "m2").exists());

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

/// An object's mtime: every object the store writes keeps the seal (1 s).
fn mtime_of(path: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mtime(), meta.mtime_nsec())
}

#[test]
fn link_checks_by_stat_only_objects_nothing_wrote_since_the_store() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 3);
    link(&t, "copy", &app);
    let objects: Vec<PathBuf> = (0..3)
        .map(|i| object_of(&t, &pyc(&app, &format!("m{i}"))))
        .collect();
    for o in &objects {
        assert_eq!(mtime_of(o), (1, 0), "{} is not sealed", o.display());
    }
    // A changed body (the header intact, as a failing disk or a write
    // through a hardlink leaves it) is found and replaced; an object only
    // touched, its bytes intact (a store older than the seal), is checked
    // byte by byte, placed and sealed again.
    let size = std::fs::metadata(&objects[0]).unwrap().len();
    flip_a_bit(&objects[0], size - 3);
    std::fs::File::open(&objects[1])
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();

    let fresh = copy_sources(&t, &app, "fresh");
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--link-mode", "copy", "--python"])
            .arg(python("3.11"))
            .arg(&fresh),
    );
    assert_output!(out, out.status.success(), "link with a changed object");
    assert_eq!(json["compiled"], 1, "{json}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not hash to its name") && stderr.contains("pycstore verify"),
        "{stderr}"
    );
    assert_imports(&fresh, 3);
    // The touched object was placed and sealed again; the changed one was
    // compiled anew (marshal's output may differ from run to run, so the new
    // object may have another name) and the new object is sealed.
    assert_eq!(object_of(&t, &pyc(&fresh, "m1")), objects[1]);
    assert_eq!(
        mtime_of(&objects[1]),
        (1, 0),
        "m1's object is not sealed again"
    );
    let rewritten = object_of(&t, &pyc(&fresh, "m0"));
    assert_eq!(
        mtime_of(&rewritten),
        (1, 0),
        "m0's new object is not sealed"
    );
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
    let index = t.store().join("index-v2");
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
    let index = t.store().join("index-v2");
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
    assert_eq!(json["entries"], 4, "{json:#}");
    let other = copy_sources(&t, &app, "other");
    link(&t, "hardlink", &other);
    assert_imports(&other, 3);

    // gc never removes the set-aside index: only its owner does.
    let (out, json) = link_json(t.pycstore().arg("gc"));
    assert_output!(out, out.status.success(), "gc");
    assert_eq!(
        json["set_aside_indexes"][0],
        aside.to_str().unwrap(),
        "{json:#}"
    );
    assert_eq!(json["old_layouts"], serde_json::json!([]), "{json:#}");
    assert!(aside.exists());
}

/// Every table (SST) of the index's column family holding the entries
/// (RocksDB's default one, where they sort first): RocksDB writes the
/// column family's name into each table's properties, after the shared
/// prefix `rocksdb.column.family.` of the key before it.
fn entries_tables(index: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(index)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sst"))
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(11).any(|w| w == b"namedefault")
        })
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no table of the entries' column family in {}",
        index.display()
    );
    found
}

/// Flips one byte inside the first data block of each table of the
/// entries' column family, as a failing disk would. The first data block
/// starts at offset 0 and holds the table's first records (entries sort
/// first: a 34-byte key and a 56-byte value), so byte 20 is inside it.
fn flip_a_byte_in_the_entries_tables(index: &Path) -> Vec<PathBuf> {
    let tables = entries_tables(index);
    for table in &tables {
        let mut bytes = std::fs::read(table).unwrap();
        bytes[20] ^= 0x10;
        std::fs::write(table, bytes).unwrap();
    }
    tables
}

fn entries_in_stats(t: &TestDir) -> u64 {
    let (out, json) = link_json(t.pycstore().arg("stats"));
    assert_output!(out, out.status.success(), "stats");
    json["entries"].as_u64().unwrap()
}

/// Every file of a directory with its bytes, to tell it was left alone.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        // RocksDB's message logs change with every open.
        .filter(|e| !e.file_name().to_string_lossy().starts_with("LOG"))
        .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

/// The names in the store root that are neither the index nor its lock
/// but start like it: indexes set aside, work directories of a repair.
fn set_aside(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("index-v2.") && n != "index-v2.lock")
        .collect()
}

#[test]
fn a_flipped_byte_in_an_index_table_is_found_and_repaired_and_nothing_is_lost() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 5);
    link(&t, "hardlink", &app);
    let entries = entries_in_stats(&t);
    let index = t.store().join("index-v2");
    let tables = flip_a_byte_in_the_entries_tables(&index);

    // A full scan with checksums finds it, names the table and the way out.
    let (out, json) = verify(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(json["index"], "damaged", "{json:#}");
    let message = problem(&json, &index)["message"].as_str().unwrap();
    let table_name = tables[0].file_name().unwrap().to_str().unwrap();
    assert!(
        message.contains("Corruption")
            && message.contains(table_name)
            && message.contains("pycstore verify --repair"),
        "{message}"
    );

    // The repair rebuilds the index beside the old one: the entries lost
    // with the damaged table come back from the pycs linked from the store.
    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["index"], "repaired", "{json:#}");
    let aside = PathBuf::from(json["index_moved_to"].as_str().unwrap());
    assert!(
        aside.join(table_name).exists(),
        "the damaged index is kept: {json:#}"
    );
    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify after repair: {json:#}");
    assert_eq!(json["problems"], serde_json::json!([]), "{json:#}");
    assert_eq!(json["orphans"], 0, "{json:#}");
    assert_eq!(entries_in_stats(&t), entries);

    // Nothing is compiled again: a fresh copy is all hits, imported from pycs.
    let fresh = copy_sources(&t, &app, "fresh");
    let json = link(&t, "hardlink", &fresh);
    assert_eq!(
        (json["compiled"].as_u64(), json["hits"].as_u64()),
        (Some(0), Some(6)),
        "{json}"
    );
    assert_imports(&fresh, 5);
    let json = link(&t, "hardlink", &app);
    assert_eq!(json["up_to_date"], 6, "{json}");
    assert_imports(&app, 5);
    let (out, json) = link_json(t.pycstore().arg("gc"));
    assert_output!(out, out.status.success(), "gc");
    assert_eq!(json["evicted"], 0, "{json:#}");
}

#[test]
fn link_treats_an_unreadable_index_entry_as_a_miss_on_every_run() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 5);
    link(&t, "hardlink", &app);
    let index = t.store().join("index-v2");
    flip_a_byte_in_the_entries_tables(&index);

    // Each run says what is wrong and compiles what it cannot read; no run
    // fails a file or loses what it compiled, however many tables pile up
    // beside the damaged one (RocksDB compacts them, and meets the damage).
    for n in 0..6 {
        let prefix = copy_sources(&t, &app, &format!("copy{n}"));
        t.write(format!("copy{n}/pkg/new.py"), format!("NEW = {n}\n"));
        let (out, json) = link_json(
            t.pycstore()
                .args(["link", "--link-mode", "hardlink", "--python"])
                .arg(python("3.11"))
                .arg(&prefix),
        );
        assert_output!(out, out.status.success(), "link {n}: {json}");
        assert_eq!(json["failed"], 0, "{json}");
        assert_imports(&prefix, 5);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("not recorded"), "link {n}: {stderr}");
        if n == 0 {
            assert!(
                stderr.contains(&index.display().to_string())
                    && stderr.contains("pycstore verify --repair"),
                "{stderr}"
            );
        }
    }
    let json = link(&t, "hardlink", &app);
    assert_eq!(json["failed"], 0, "{json}");

    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["index"], "repaired", "{json:#}");
    let (out, json) = verify(&t, &[]);
    assert_output!(out, out.status.success(), "verify after repair: {json:#}");
    let last = copy_sources(&t, &app, "last");
    let json = link(&t, "hardlink", &last);
    assert_eq!(json["compiled"], 0, "{json}");
    assert_imports(&last, 5);
}

/// Fills the filesystem of `dir` with a file `dir/fill`.
fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("fill");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&chunk) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            break;
        }
    }
    // What is left is less than a chunk: fill it byte by byte.
    while file.write_all(&[0]).is_ok() {}
    path
}

#[test]
fn a_full_disk_never_loses_the_index() {
    let t = TestDir::new();
    let Some(small) = crate::hostile::Tmpfs::mount(&t, "small", "48m") else {
        return;
    };
    let store = small.path.join("store");
    let app = copy_sources(&t, &write_app(&t, "src", 5), "small/app");
    let mut cmd = pycstore(&store);
    let (out, json) = link_json(
        cmd.args(["link", "--link-mode", "hardlink", "--python"])
            .arg(python("3.11"))
            .arg(&app),
    );
    assert_output!(out, out.status.success(), "link: {json}");
    let stats = |store: &Path| {
        let (out, json) = link_json(pycstore(store).arg("stats"));
        assert_output!(out, out.status.success(), "stats");
        json
    };
    let before = stats(&store);
    let index = store.join("index-v2");

    // On a full disk the healthy index is not called damaged, and a repair
    // has nothing to do and moves nothing.
    let fill = fill_up(&small.path);
    let (out, json) = link_json(pycstore(&store).arg("verify"));
    assert_output!(out, out.status.success(), "verify on a full disk: {json:#}");
    assert_eq!(json["index"], "ok", "{json:#}");
    let (out, json) = link_json(pycstore(&store).args(["verify", "--repair"]));
    assert_output!(
        out,
        out.status.success(),
        "verify --repair on a full disk: {json:#}"
    );
    assert_eq!(json["index"], "ok", "{json:#}");
    assert_eq!(set_aside(&store), Vec::<String>::new());
    // What must write says why it cannot, and that it is not damage.
    let out = run(pycstore(&store).arg("gc"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot open the index: no space left on `{}`",
            index.display()
        )) && stderr.contains("free some space"),
        "{stderr}"
    );

    // Space freed: every entry is there, and gc evicts nothing linked.
    std::fs::remove_file(&fill).unwrap();
    assert_eq!(stats(&store)["entries"], before["entries"]);
    let (out, json) = link_json(pycstore(&store).arg("gc"));
    assert_output!(out, out.status.success(), "gc: {json:#}");
    assert_eq!(json["evicted"], 0, "{json:#}");

    // A damaged index on a full disk: the repair checks for room before it
    // moves anything, and leaves the index as it was.
    flip_a_byte_in_the_entries_tables(&index);
    let fill = fill_up(&small.path);
    let (out, json) = link_json(pycstore(&store).arg("verify"));
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(json["index"], "damaged", "{json:#}");
    let damaged = snapshot(&index);
    let out = run(pycstore(&store).args(["verify", "--repair"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot repair the index: no space left on `{}`",
            index.display()
        )) && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert!(snapshot(&index) == damaged, "the index was changed");
    assert_eq!(set_aside(&store), Vec::<String>::new());

    // Space freed: the repair recovers every entry; nothing is compiled
    // again and nothing linked is evicted.
    std::fs::remove_file(&fill).unwrap();
    let (out, json) = link_json(pycstore(&store).args(["verify", "--repair"]));
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["index"], "repaired", "{json:#}");
    assert_eq!(stats(&store)["entries"], before["entries"]);
    let (out, json) = link_json(pycstore(&store).arg("gc"));
    assert_output!(out, out.status.success(), "gc: {json:#}");
    assert_eq!(json["evicted"], 0, "{json:#}");
    let fresh = copy_sources(&t, &app, "small/fresh");
    let mut cmd = pycstore(&store);
    let (out, json) = link_json(
        cmd.args(["link", "--link-mode", "hardlink", "--python"])
            .arg(python("3.11"))
            .arg(&fresh),
    );
    assert_output!(out, out.status.success(), "link: {json}");
    assert_eq!(json["compiled"], 0, "{json}");
    assert_imports(&fresh, 5);
}

#[test]
fn gc_keeps_orphans_while_an_index_is_set_aside() {
    let t = TestDir::new();
    let app = write_app(&t, "app", 3);
    link(&t, "hardlink", &app);
    // An older pycstore set the index aside and started an empty one.
    let aside = t.store().join("index-v2.broken-1700000000");
    std::fs::rename(t.store().join("index-v2"), &aside).unwrap();
    assert_eq!(entries_in_stats(&t), 0);
    let objects: Vec<PathBuf> = (0..3)
        .map(|i| object_of(&t, &pyc(&app, &format!("m{i}"))))
        .collect();

    let (out, json) = link_json(t.pycstore().arg("gc"));
    assert_output!(out, out.status.success(), "gc: {json:#}");
    assert_eq!(json["evicted"], 0, "{json:#}");
    assert_eq!(json["orphans_kept"], 4, "{json:#}");
    assert_eq!(json["set_aside_indexes"][0], aside.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the index set aside at `{}`", aside.display())),
        "{stderr}"
    );
    let (out, json) = verify(&t, &["--repair"]);
    assert_output!(out, out.status.success(), "verify --repair: {json:#}");
    assert_eq!(json["repairs"]["orphans_removed"], 0, "{json:#}");
    assert!(aside.exists() && objects.iter().all(|o| o.exists()));
}

#[test]
fn an_object_python_cannot_load_is_reported_and_after_repair_link_compiles_it() {
    use pycstore_store::index::{Entry, Writes};
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
        let bad_entry = Entry {
            object: bad,
            size: garbage.len() as u64,
            header: garbage[..16].try_into().unwrap(),
        };
        for (key, slot, old) in index.entries().unwrap() {
            if old.is_some_and(|old| old.object == good_id) {
                writes.entry(&key, slot, &bad_entry);
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
