//! How pycs get into a prefix: reflink, hardlink or copy, chosen per
//! filesystem, and what each leaves on disk for Python to import. Also what
//! `link` does with pycs that are already there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::util::*;

/// `statfs` magic numbers, as `stat -f -c %t` prints them (hex, no `0x`).
const EXT4_MAGIC: &str = "ef53";
const XFS_MAGIC: &str = "58465342";
const BTRFS_MAGIC: &str = "9123683e";

/// ext4's limit on the links of one inode.
const EXT4_LINK_MAX: u64 = 65_000;

/// The filesystem type of `path`, as the hex `statfs` magic.
fn fs_magic(path: &Path) -> String {
    let out = run_ok(Command::new("stat").args(["-f", "-c", "%t"]).arg(path));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn assert_fs(path: &Path, magic: &str, name: &str) {
    let found = fs_magic(path);
    assert_eq!(
        found,
        magic,
        "{} should be on {name} (statfs magic {magic}), found magic {found}",
        path.display()
    );
}

/// A small package and a module that imports it: 4 sources.
const SMALL_PREFIX: &[(&str, &str)] = &[
    ("pkg/__init__.py", "from . import alpha, beta\n"),
    ("pkg/alpha.py", "A = 1\n\n\ndef f():\n    return A + 1\n"),
    (
        "pkg/beta.py",
        "from pkg.alpha import A, f\n\nB = A * 2 + f()\n",
    ),
    (
        "top.py",
        "import pkg\n\nassert pkg.beta.B == 4, pkg.beta.B\n",
    ),
];

fn write_small_prefix(prefix: &Path) -> Vec<PathBuf> {
    SMALL_PREFIX
        .iter()
        .map(|(rel, text)| {
            let path = prefix.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

/// Where Python 3.11 looks for the optimize-0 pyc of `source`.
fn pyc_of(source: &Path) -> PathBuf {
    let stem = source.file_stem().unwrap().to_str().unwrap();
    source
        .parent()
        .unwrap()
        .join("__pycache__")
        .join(format!("{stem}.cpython-311.pyc"))
}

/// Imports `top` (and through it the whole package) from `prefix` and
/// asserts every module came from a pyc.
fn assert_small_prefix_imports(prefix: &Path) {
    let log = python_v(
        &python("3.11"),
        &["-c", "import top"],
        &[("PYTHONPATH", prefix.as_os_str())],
    );
    assert_nothing_compiled(&log, prefix, SMALL_PREFIX.len());
}

/// Every object file of a store.
fn store_objects(store: &Path) -> Vec<PathBuf> {
    let root = store.join("objects-v1");
    let objects: Vec<PathBuf> = walkdir::WalkDir::new(&root)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    assert!(!objects.is_empty(), "no objects under {}", root.display());
    objects
}

/// `pycstore link --python <3.11> [ARGS] PREFIX --json`.
fn link(store: &Path, prefix: &Path, args: &[&str]) -> (Output, Value) {
    let mut cmd = pycstore(store);
    cmd.arg("link")
        .arg("--python")
        .arg(python("3.11"))
        .args(["-j", "2"])
        .args(args)
        .arg(prefix);
    link_json(&mut cmd)
}

fn count(json: &Value, field: &str) -> u64 {
    json[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {field:?} in {json:#}"))
}

/// Asserts a successful first link of the small prefix: everything compiled,
/// placed with `mode`.
fn assert_linked(out: &Output, json: &Value, mode: &str) {
    assert_output!(
        out,
        out.status.success()
            && json["link_modes"] == json!([mode])
            && count(json, "sources") == SMALL_PREFIX.len() as u64
            && count(json, "compiled") == SMALL_PREFIX.len() as u64
            && count(json, "failed") == 0
            && json["failures"] == json!([]),
        "expected all {} sources compiled and placed by {mode}",
        SMALL_PREFIX.len()
    );
}

/// The failures of a JSON report, by path.
fn failures_by_path(json: &Value) -> BTreeMap<PathBuf, String> {
    json["failures"]
        .as_array()
        .unwrap_or_else(|| panic!("no failures list in {json:#}"))
        .iter()
        .map(|f| {
            (
                PathBuf::from(f["path"].as_str().unwrap()),
                f["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every file below `root` that is not one of `sources` (pycs, temp files).
fn files_besides(root: &Path, sources: &[PathBuf]) -> Vec<PathBuf> {
    let sources: BTreeSet<&PathBuf> = sources.iter().collect();
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_type().is_dir() && !sources.contains(&e.path().to_path_buf()))
        .map(|e| e.into_path())
        .collect()
}

/// The default link mode on ext4 is a hardlink to the store's read-only object.
#[test]
fn auto_on_ext4_hardlinks_store_objects() {
    let t = TestDir::new();
    assert_fs(t.path(), EXT4_MAGIC, "ext4");
    let prefix = t.join("prefix");
    let sources = write_small_prefix(&prefix);

    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_linked(&out, &json, "hardlink");
    assert_eq!(count(&json, "bytes_copied"), 0, "{json:#}");
    assert!(count(&json, "bytes_shared") > 0, "{json:#}");

    let objects: HashMap<u64, PathBuf> = store_objects(&t.store())
        .into_iter()
        .map(|p| (std::fs::metadata(&p).unwrap().ino(), p))
        .collect();
    let store_dev = std::fs::metadata(t.store()).unwrap().dev();
    for source in &sources {
        let pyc = pyc_of(source);
        let meta =
            std::fs::symlink_metadata(&pyc).unwrap_or_else(|e| panic!("{}: {e}", pyc.display()));
        assert!(
            meta.file_type().is_file(),
            "{} is not a regular file",
            pyc.display()
        );
        assert_eq!(meta.dev(), store_dev);
        let object = objects.get(&meta.ino()).unwrap_or_else(|| {
            panic!(
                "{} (inode {}) shares its inode with no store object: {objects:#?}",
                pyc.display(),
                meta.ino()
            )
        });
        assert!(
            meta.nlink() >= 2,
            "{} has {} links",
            pyc.display(),
            meta.nlink()
        );
        assert_eq!(std::fs::read(&pyc).unwrap(), std::fs::read(object).unwrap());
        assert_eq!(
            meta.permissions().mode() & 0o222,
            0,
            "{} is writable (mode {:o}): a write through it would change the store",
            pyc.display(),
            meta.permissions().mode()
        );
    }
    assert_small_prefix_imports(&prefix);

    // A second run finds everything in place and touches nothing.
    let inodes: Vec<u64> = sources
        .iter()
        .map(|s| std::fs::metadata(pyc_of(s)).unwrap().ino())
        .collect();
    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_output!(
        out,
        out.status.success() && count(&json, "up_to_date") == SMALL_PREFIX.len() as u64,
        "second run should find all pycs up to date"
    );
    let after: Vec<u64> = sources
        .iter()
        .map(|s| std::fs::metadata(pyc_of(s)).unwrap().ino())
        .collect();
    assert_eq!(inodes, after, "up-to-date pycs were replaced");
}

/// On a filesystem with reflink, the pyc is a clone: its own inode (so
/// nothing done to it can reach the store), the object's bytes.
fn auto_reflinks_on(var: &str, magic: &str, name: &str) {
    let Some(root) = test_fs(var) else { return };
    let t = TestDir::new_in(&root);
    assert_fs(t.path(), magic, name);
    let prefix = t.join("prefix");
    let sources = write_small_prefix(&prefix);

    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_linked(&out, &json, "reflink");
    assert_eq!(count(&json, "bytes_copied"), 0, "{json:#}");
    assert!(count(&json, "bytes_shared") > 0, "{json:#}");

    let objects = store_objects(&t.store());
    let object_inodes: BTreeSet<u64> = objects
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect();
    let object_bytes: HashMap<Vec<u8>, &PathBuf> = objects
        .iter()
        .map(|p| (std::fs::read(p).unwrap(), p))
        .collect();
    for source in &sources {
        let pyc = pyc_of(source);
        let meta =
            std::fs::symlink_metadata(&pyc).unwrap_or_else(|e| panic!("{}: {e}", pyc.display()));
        assert!(
            meta.file_type().is_file(),
            "{} is not a regular file",
            pyc.display()
        );
        assert_eq!(meta.nlink(), 1, "{} is hardlinked", pyc.display());
        assert!(
            !object_inodes.contains(&meta.ino()),
            "{} shares an inode with a store object",
            pyc.display()
        );
        let bytes = std::fs::read(&pyc).unwrap();
        assert!(
            object_bytes.contains_key(&bytes),
            "{} has bytes of no store object",
            pyc.display()
        );
    }
    assert_small_prefix_imports(&prefix);
}

#[test]
fn auto_on_xfs_reflinks() {
    auto_reflinks_on("PYCSTORE_TEST_XFS", XFS_MAGIC, "XFS");
}

#[test]
fn auto_on_btrfs_reflinks() {
    auto_reflinks_on("PYCSTORE_TEST_BTRFS", BTRFS_MAGIC, "btrfs");
}

/// Asking for reflinks where there are none is an error per file, not a
/// silent fallback.
#[test]
fn reflink_mode_on_ext4_fails_per_file() {
    let t = TestDir::new();
    assert_fs(t.path(), EXT4_MAGIC, "ext4");
    let prefix = t.join("prefix");
    let sources = write_small_prefix(&prefix);

    // What a person sees: one line per source on stderr, exit code 1.
    let out = run(t
        .pycstore()
        .arg("link")
        .arg("--python")
        .arg(python("3.11"))
        .args(["--link-mode", "reflink"])
        .arg(&prefix));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(1),
        "--link-mode reflink on ext4 should exit 1"
    );
    for source in &sources {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("pycstore: {}: ", source.display())));
        assert_output!(
            out,
            line.is_some_and(|l| l.contains("reflink")),
            "no error about reflink for {}",
            source.display()
        );
    }

    // The same through --json, now with the objects already in the store.
    let (out, json) = link(&t.store(), &prefix, &["--link-mode", "reflink"]);
    let failures = failures_by_path(&json);
    assert_output!(
        out,
        out.status.code() == Some(1)
            && count(&json, "failed") == sources.len() as u64
            && failures.len() == sources.len()
            && json["link_modes"] == json!([]),
        "expected one failure per source and no link mode used"
    );
    for source in &sources {
        let message = failures
            .get(source)
            .unwrap_or_else(|| panic!("no failure for {}: {json:#}", source.display()));
        assert!(
            message.contains("reflink") && message.contains(pyc_of(source).to_str().unwrap()),
            "the error for {} should say reflink and name the pyc: {message}",
            source.display()
        );
    }
    assert_eq!(files_besides(&prefix, &sources), Vec::<PathBuf>::new());
}

/// A store on another filesystem than the prefix: `auto` copies, and says so.
#[test]
fn auto_across_devices_copies_with_a_warning() {
    let Some(xfs) = test_fs("PYCSTORE_TEST_XFS") else {
        return;
    };
    let home = TestDir::new();
    assert_fs(home.path(), EXT4_MAGIC, "ext4");
    let there = TestDir::new_in(&xfs);
    assert_fs(there.path(), XFS_MAGIC, "XFS");
    let prefix = there.join("prefix");
    let sources = write_small_prefix(&prefix);

    let (out, json) = link(&home.store(), &prefix, &[]);
    assert_linked(&out, &json, "copy");
    assert_eq!(count(&json, "bytes_shared"), 0, "{json:#}");
    assert!(count(&json, "bytes_copied") > 0, "{json:#}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_output!(
        out,
        warnings.len() == 1 && warnings[0].to_lowercase().contains("copying"),
        "expected exactly one warning on stderr about copying, got {warnings:#?}"
    );

    let object_bytes: BTreeSet<Vec<u8>> = store_objects(&home.store())
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    for source in &sources {
        let pyc = pyc_of(source);
        let meta =
            std::fs::symlink_metadata(&pyc).unwrap_or_else(|e| panic!("{}: {e}", pyc.display()));
        assert!(meta.file_type().is_file() && meta.nlink() == 1);
        assert!(object_bytes.contains(&std::fs::read(&pyc).unwrap()));
    }
    assert_small_prefix_imports(&prefix);
}

/// Hardlinks cannot cross filesystems: each file fails, naming its pyc, and
/// nothing half-made is left in the prefix.
#[test]
fn hardlink_mode_across_devices_fails_per_file() {
    let Some(xfs) = test_fs("PYCSTORE_TEST_XFS") else {
        return;
    };
    let home = TestDir::new();
    assert_fs(home.path(), EXT4_MAGIC, "ext4");
    let there = TestDir::new_in(&xfs);
    assert_fs(there.path(), XFS_MAGIC, "XFS");
    let prefix = there.join("prefix");
    let sources = write_small_prefix(&prefix);

    let (out, json) = link(&home.store(), &prefix, &["--link-mode", "hardlink"]);
    let failures = failures_by_path(&json);
    assert_output!(
        out,
        out.status.code() == Some(1)
            && count(&json, "failed") == sources.len() as u64
            && failures.len() == sources.len(),
        "expected exit code 1 and one failure per source"
    );
    for source in &sources {
        let message = failures
            .get(source)
            .unwrap_or_else(|| panic!("no failure for {}: {json:#}", source.display()));
        assert!(
            message.contains("hardlink") && message.contains(pyc_of(source).to_str().unwrap()),
            "the error for {} should say hardlink and name the pyc: {message}",
            source.display()
        );
    }
    assert_eq!(
        files_besides(&prefix, &sources),
        Vec::<PathBuf>::new(),
        "failed hardlinks left files in the prefix"
    );
}

/// More pycs of one object than ext4 allows links to one inode: the object
/// gets a fresh inode and linking goes on.
#[test]
fn hardlink_past_the_ext4_link_limit() {
    const DIRS: usize = 130;
    const PER_DIR: usize = 500;
    const EXTRA: usize = 10;
    const TOTAL: usize = DIRS * PER_DIR + EXTRA;

    let t = TestDir::new();
    assert_fs(t.path(), EXT4_MAGIC, "ext4");
    let prefix = t.join("prefix");
    // Empty modules, all one object. Names are unique so any of them can be
    // imported with its directory on sys.path.
    let mut sources = Vec::with_capacity(TOTAL);
    for d in 0..=DIRS {
        let dir = prefix.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        let n = if d == DIRS { EXTRA } else { PER_DIR };
        for m in 0..n {
            let path = dir.join(format!("m{d}_{m}.py"));
            std::fs::write(&path, b"").unwrap();
            sources.push(path);
        }
    }
    assert_eq!(sources.len(), TOTAL);

    let (out, json) = link(&t.store(), &prefix, &["--link-mode", "hardlink"]);
    assert_output!(
        out,
        out.status.success()
            && count(&json, "sources") == TOTAL as u64
            && count(&json, "compiled") + count(&json, "hits") == TOTAL as u64
            && count(&json, "failed") == 0
            && json["link_modes"] == json!(["hardlink"]),
        "expected all {TOTAL} pycs hardlinked: {}",
        serde_json::to_string(&json["failures"].as_array().map(|f| &f[..f.len().min(5)])).unwrap()
    );

    let mut by_inode: BTreeMap<u64, Vec<&Path>> = BTreeMap::new();
    // Distinct pyc contents: their size and how many pycs have them.
    let mut contents: HashMap<Vec<u8>, usize> = HashMap::new();
    for source in &sources {
        let pyc = pyc_of(source);
        let meta =
            std::fs::symlink_metadata(&pyc).unwrap_or_else(|e| panic!("{}: {e}", pyc.display()));
        assert!(
            meta.file_type().is_file(),
            "{} is not a regular file",
            pyc.display()
        );
        assert!(meta.nlink() <= EXT4_LINK_MAX);
        by_inode.entry(meta.ino()).or_default().push(source);
        *contents.entry(std::fs::read(&pyc).unwrap()).or_default() += 1;
    }
    let per_inode: Vec<usize> = by_inode.values().map(Vec::len).collect();
    assert!(
        by_inode.len() >= 2,
        "{TOTAL} links cannot share one ext4 inode; pycs per inode: {per_inode:?}"
    );

    // Import one module from each inode: all load from their pycs.
    let picked: Vec<&Path> = by_inode.values().map(|v| v[v.len() / 2]).collect();
    let dirs: Vec<&Path> = picked.iter().map(|p| p.parent().unwrap()).collect();
    let path = std::env::join_paths(&dirs).unwrap();
    let modules: Vec<&str> = picked
        .iter()
        .map(|p| p.file_stem().and_then(OsStr::to_str).unwrap())
        .collect();
    let log = python_v(
        &python("3.11"),
        &["-c", &format!("import {}", modules.join(", "))],
        &[("PYTHONPATH", path.as_os_str())],
    );
    assert_nothing_compiled(&log, &prefix, picked.len());

    // One source text, one compile key: compiled once, one object, and every
    // pyc byte-identical (the pycs of the first inode and of the fresh one).
    let objects = store_objects(&t.store());
    let object_sizes: Vec<u64> = objects
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    let content_counts: Vec<(usize, usize)> = contents
        .iter()
        .map(|(bytes, n)| (bytes.len(), *n))
        .collect();
    assert!(
        objects.len() == 1 && contents.len() == 1,
        "{TOTAL} identical sources should compile once into one object; the store holds \
         {} objects (sizes {object_sizes:?}) and the pycs have {} distinct contents \
         ((size, pycs): {content_counts:?})",
        objects.len(),
        contents.len()
    );
    // The store's object is the newest inode, still linked to by pycs.
    let object_ino = std::fs::metadata(&objects[0]).unwrap().ino();
    assert!(
        by_inode.contains_key(&object_ino),
        "no pyc shares the store object's inode; pycs per inode: {per_inode:?}"
    );
}

/// Runs a snippet with Python 3.11 (with bytecode writing allowed).
fn python_c(code: &str) {
    run_ok(
        Command::new(python("3.11"))
            .args(["-c", code])
            .env_remove("PYTHONDONTWRITEBYTECODE"),
    );
}

/// `py_compile.compile(source, cfile, invalidation_mode=mode)` in Python 3.11.
fn py_compile(source: &Path, cfile: &Path, mode: &str) {
    std::fs::create_dir_all(cfile.parent().unwrap()).unwrap();
    python_c(&format!(
        "import py_compile\n\
         py_compile.compile({source:?}, cfile={cfile:?}, doraise=True,\n\
         invalidation_mode=py_compile.PycInvalidationMode.{mode})",
        source = source.to_str().unwrap(),
        cfile = cfile.to_str().unwrap(),
    ));
}

/// A pyc with a well-formed header for another source is replaced.
#[test]
fn stale_pyc_is_replaced() {
    let t = TestDir::new();
    assert_fs(t.path(), EXT4_MAGIC, "ext4");
    let prefix = t.join("prefix");
    let a = t.write("prefix/a.py", "X = 1\n");
    let b = t.write("prefix/b.py", "Y = 2\n");
    // b's pyc at a's name: the right magic and flavor, b's source hash.
    py_compile(&b, &pyc_of(&a), "CHECKED_HASH");
    let stale = std::fs::read(pyc_of(&a)).unwrap();
    assert_eq!(&stale[4..8], &[3, 0, 0, 0], "a checked-hash header");
    let stale_ino = std::fs::metadata(pyc_of(&a)).unwrap().ino();

    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_output!(
        out,
        out.status.success()
            && count(&json, "up_to_date") == 0
            && count(&json, "compiled") == 2
            && count(&json, "failed") == 0,
        "the stale pyc should have been replaced"
    );
    let meta = std::fs::metadata(pyc_of(&a)).unwrap();
    assert_ne!(meta.ino(), stale_ino, "the stale pyc is still there");
    let fresh = std::fs::read(pyc_of(&a)).unwrap();
    assert_ne!(fresh, stale);
    let objects: BTreeSet<u64> = store_objects(&t.store())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect();
    assert!(
        objects.contains(&meta.ino()),
        "a's pyc is not the store's object"
    );

    let log = python_v(
        &python("3.11"),
        &["-c", "import a, b; assert (a.X, b.Y) == (1, 2)"],
        &[("PYTHONPATH", prefix.as_os_str())],
    );
    assert_nothing_compiled(&log, &prefix, 2);
}

/// A valid pyc of the wanted flavor, written by Python itself, is left alone.
#[test]
fn valid_pyc_written_by_python_is_left_alone() {
    let t = TestDir::new();
    let prefix = t.join("prefix");
    let a = t.write("prefix/a.py", "X = 1\n");
    let b = t.write("prefix/b.py", "Y = 2\n");
    for source in [&a, &b] {
        py_compile(source, &pyc_of(source), "CHECKED_HASH");
    }
    let before: Vec<(u64, Vec<u8>)> = [&a, &b]
        .iter()
        .map(|s| {
            let pyc = pyc_of(s);
            (
                std::fs::metadata(&pyc).unwrap().ino(),
                std::fs::read(&pyc).unwrap(),
            )
        })
        .collect();

    // The store compiles both (it has neither) and finds the same bytes
    // there: it says it compiled them, and leaves Python's files alone.
    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_output!(
        out,
        out.status.success()
            && count(&json, "up_to_date") == 0
            && count(&json, "compiled") == 2
            && count(&json, "hits") == 0
            && count(&json, "failed") == 0,
        "Python's own checked-hash pycs should count as compiled once, and be kept"
    );
    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_output!(
        out,
        out.status.success() && count(&json, "up_to_date") == 2 && count(&json, "compiled") == 0,
        "linked again, Python's pycs are up to date"
    );
    let after: Vec<(u64, Vec<u8>)> = [&a, &b]
        .iter()
        .map(|s| {
            let pyc = pyc_of(s);
            (
                std::fs::metadata(&pyc).unwrap().ino(),
                std::fs::read(&pyc).unwrap(),
            )
        })
        .collect();
    assert!(before == after, "valid pycs were rewritten");

    let log = python_v(
        &python("3.11"),
        &["-c", "import a, b; assert (a.X, b.Y) == (1, 2)"],
        &[("PYTHONPATH", prefix.as_os_str())],
    );
    assert_nothing_compiled(&log, &prefix, 2);
}

/// A valid pyc of another flavor (Python's default, timestamp) is replaced by
/// the flavor asked for.
#[test]
fn valid_pyc_of_another_flavor_is_replaced() {
    let t = TestDir::new();
    let prefix = t.join("prefix");
    let a = t.write("prefix/a.py", "X = 1\n");
    py_compile(&a, &pyc_of(&a), "TIMESTAMP");
    assert_eq!(&std::fs::read(pyc_of(&a)).unwrap()[4..8], &[0, 0, 0, 0]);

    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_output!(
        out,
        out.status.success() && count(&json, "up_to_date") == 0 && count(&json, "compiled") == 1,
        "a timestamp pyc is not the checked-hash pyc asked for"
    );
    let bytes = std::fs::read(pyc_of(&a)).unwrap();
    assert_eq!(&bytes[4..8], &[3, 0, 0, 0], "expected a checked-hash pyc");
    let log = python_v(
        &python("3.11"),
        &["-c", "import a; assert a.X == 1"],
        &[("PYTHONPATH", prefix.as_os_str())],
    );
    assert_nothing_compiled(&log, &prefix, 1);
}

/// Cuts a pyc down to its 16-byte header and a few bytes of its body,
/// replacing the file (never writing through a link into the store).
fn truncate_pyc(pyc: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(pyc).unwrap();
    assert!(bytes.len() > 30, "{} is too short to cut", pyc.display());
    bytes.truncate(30);
    std::fs::remove_file(pyc).unwrap();
    std::fs::write(pyc, &bytes).unwrap();
    bytes
}

/// Asserts `link` put a whole pyc back in place of a cut one, and Python
/// imports it.
fn assert_partial_pyc_replaced(t: &TestDir, prefix: &Path, source: &Path, partial: &[u8]) {
    let (out, json) = link(&t.store(), prefix, &[]);
    let now = std::fs::read(pyc_of(source)).unwrap();
    assert_output!(
        out,
        out.status.success() && count(&json, "up_to_date") == 0 && now != partial,
        "expected the cut pyc ({} bytes, valid header) replaced by a whole one; \
         left in place, Python fails to import it (EOFError: marshal data too short)",
        partial.len()
    );
    let log = python_v(
        &python("3.11"),
        &["-c", "import a; assert a.f() == 1"],
        &[("PYTHONPATH", prefix.as_os_str())],
    );
    assert_nothing_compiled(&log, prefix, 1);
}

const A_SOURCE: &str = "X = 1\n\n\ndef f():\n    return X\n";

/// A partial pyc (a crashed writer that did not write through a temp file)
/// has a valid header: it must still be replaced, since Python would fail on
/// its body rather than recompile.
#[test]
fn partial_pyc_with_valid_header_is_replaced() {
    let t = TestDir::new();
    let prefix = t.join("prefix");
    let a = t.write("prefix/a.py", A_SOURCE);
    py_compile(&a, &pyc_of(&a), "CHECKED_HASH");
    let partial = truncate_pyc(&pyc_of(&a));
    assert_partial_pyc_replaced(&t, &prefix, &a, &partial);
}

/// The same when the store already holds the whole pyc for that source: its
/// size alone shows the file in the prefix is not it.
#[test]
fn partial_copy_of_a_store_pyc_is_replaced() {
    let t = TestDir::new();
    let prefix = t.join("prefix");
    let a = t.write("prefix/a.py", A_SOURCE);
    let (out, json) = link(&t.store(), &prefix, &[]);
    assert_output!(
        out,
        out.status.success() && count(&json, "compiled") == 1,
        "the first link failed"
    );
    let partial = truncate_pyc(&pyc_of(&a));
    assert_partial_pyc_replaced(&t, &prefix, &a, &partial);
}
