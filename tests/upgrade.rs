//! A store written by an earlier version: its index, of the earlier layout
//! (`index-v1`, a column family for each kind of record), is carried over
//! to this version's (`index-v2`) once, and nothing in it is compiled again.
//!
//! `tests/data/store-index-v1.tar.gz` holds such a store and the app it
//! was linked from (see `tests/data/README.md`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fuse::ReadOnly;
use crate::util::*;

/// The store of an earlier version (`t/store`) and the app it compiled
/// (`t/app`, without pycs).
fn earlier_store(t: &TestDir) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/store-index-v1.tar.gz");
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(&fixture)
            .arg("-C")
            .arg(t.join("")),
    );
    assert!(t.store().join("index-v1/CURRENT").exists());
    t.join("app")
}

fn stats(t: &TestDir) -> serde_json::Value {
    let (out, json) = link_json(t.pycstore().arg("stats"));
    assert_output!(out, out.status.success(), "stats");
    json
}

fn link(t: &TestDir, app: &Path) -> serde_json::Value {
    let (out, json) = link_json(
        t.pycstore()
            .args(["link", "--link-mode", "hardlink", "--python"])
            .arg(python("3.11"))
            .arg(app),
    );
    assert_output!(out, out.status.success(), "link {}", app.display());
    json
}

fn assert_imports(app: &Path) {
    let log = python_v(
        &python("3.11"),
        &["-c", "import pkg"],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, app, 6);
}

/// The names in the store root of indexes and their leftovers.
fn indexes(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("index-"))
        .collect();
    names.sort();
    names
}

#[test]
fn an_index_of_the_earlier_layout_is_carried_over_once_and_nothing_is_compiled_again() {
    let t = TestDir::new();
    let app = earlier_store(&t);

    // Opened by several processes at once: one carries the index over, the
    // others wait for it and find it done.
    let children: Vec<_> = (0..4)
        .map(|_| {
            t.pycstore()
                .args(["stats", "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_output!(out, out.status.success(), "stats while carrying over");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (json["entries"].as_u64(), json["objects"].as_u64()),
            (Some(6), Some(6)),
            "{json:#}"
        );
    }
    // The earlier index is gone; its lock stays (an earlier version may
    // wait on it), with a marker for earlier versions; nothing else.
    assert_eq!(
        indexes(&t.store()),
        [
            "index-v1.lock",
            "index-v1.migrated",
            "index-v2",
            "index-v2.lock"
        ],
        "{}",
        t.store().display()
    );
    // What the earlier version counted is kept.
    let json = stats(&t);
    assert_eq!(
        json["usage"]["cpython-311 a70d0d0a"]["compiles"], 6,
        "{json:#}"
    );

    // A link of the app: every pyc from the store, none compiled.
    let json = link(&t, &app);
    assert_eq!(
        (json["compiled"].as_u64(), json["hits"].as_u64()),
        (Some(0), Some(6)),
        "{json}"
    );
    assert_imports(&app);
    let (out, json) = link_json(t.pycstore().arg("verify"));
    assert_output!(out, out.status.success(), "verify: {json:#}");
    assert_eq!(json["problems"], serde_json::json!([]), "{json:#}");
    assert_eq!(json["orphans"], 0, "{json:#}");
    assert_eq!(json["set_aside_indexes"], serde_json::json!([]), "{json:#}");
}

#[test]
fn a_damaged_index_of_the_earlier_layout_is_carried_over_as_far_as_it_reads_and_kept() {
    let t = TestDir::new();
    let app = earlier_store(&t);
    // A flipped byte in the first data block of the earlier index's table
    // of entries (RocksDB writes a column family's name into its tables).
    let old = t.store().join("index-v1");
    let table = std::fs::read_dir(&old)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "sst")
                && std::fs::read(p)
                    .unwrap()
                    .windows(11)
                    .any(|w| w == b"nameentries")
        })
        .expect("a table of entries");
    let mut bytes = std::fs::read(&table).unwrap();
    bytes[20] ^= 0x10;
    std::fs::write(&table, bytes).unwrap();

    // The store opens; what could be read is carried over, and the damaged
    // index is set aside, named, with the way to see it.
    let out = run(t.pycstore().args(["stats", "--json"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.success()
            && stderr.contains("index-v1.broken-")
            && stderr.contains("pycstore verify"),
        "a damaged earlier index is reported"
    );
    let names = indexes(&t.store());
    let aside = names
        .iter()
        .find(|n| n.starts_with("index-v1.broken-"))
        .unwrap_or_else(|| panic!("set aside: {names:?}"));
    assert!(!t.store().join("index-v1").exists(), "{names:?}");

    // The link compiles what was lost, and imports use it; the objects the
    // set-aside index names are kept by gc, and verify says why.
    let json = link(&t, &app);
    assert_eq!(json["failed"], 0, "{json}");
    assert_imports(&app);
    let (out, json) = link_json(t.pycstore().arg("verify"));
    assert_output!(out, out.status.success(), "verify: {json:#}");
    assert_eq!(
        json["set_aside_indexes"][0],
        t.store().join(aside).to_str().unwrap(),
        "{json:#}"
    );
    let (out, json) = link_json(t.pycstore().args(["gc", "--max-size", "0"]));
    assert_output!(out, out.status.success(), "gc");
    assert_eq!(
        json["set_aside_indexes"][0],
        t.store().join(aside).to_str().unwrap(),
        "{json:#}"
    );
}

#[test]
fn an_earlier_index_on_a_read_only_store_is_left_as_it_is() {
    let t = TestDir::new();
    earlier_store(&t);
    let before = crate::fuse::tree_hash(&t.store());
    let ro = ReadOnly::new(&t.store());
    let out = run(t.pycstore().args(["stats"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2)
            && stderr.contains(&t.store().display().to_string())
            && stderr.contains("Read-only file system"),
        "the store is named, with why it cannot be opened"
    );
    ro.release();
    assert_eq!(
        crate::fuse::tree_hash(&t.store()),
        before,
        "the store is unchanged"
    );
    // Once the store can be written, it is carried over.
    assert_eq!(stats(&t)["entries"], 6);
}
