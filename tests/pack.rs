//! `export` and `import`: a pack made on one store lets another link without
//! compiling; a damaged pack is refused and changes nothing; `--python` and
//! `--prefix` choose what goes in.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::util::*;

/// Runs a `--json` command that must succeed and returns its summary.
fn json_ok(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON from {cmd:?}: {e}\n--- stdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `pycstore --store STORE link --python PYTHON PREFIX --json`, which must
/// succeed.
fn link(store: &Path, python: &Path, prefix: &Path, extra: &[&str]) -> serde_json::Value {
    let (out, json) = link_json(
        pycstore(store)
            .arg("link")
            .args(extra)
            .arg("--python")
            .arg(python)
            .arg(prefix),
    );
    assert_output!(out, out.status.success(), "link failed: {json}");
    json
}

/// Every file under `root` with its mode and bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let meta = e.metadata().unwrap();
            (
                e.path().strip_prefix(root).unwrap().to_path_buf(),
                (meta.permissions().mode(), std::fs::read(e.path()).unwrap()),
            )
        })
        .collect()
}

/// A directory of `n` small modules whose sources differ by `tag`.
fn write_app(t: &TestDir, dir: &str, tag: &str, n: usize) -> PathBuf {
    for i in 0..n {
        t.write(
            format!("{dir}/mod_{i}.py"),
            format!("# {tag}\nVALUE = {i}\n\ndef f(x):\n    return x * {i} + len({tag:?})\n"),
        );
    }
    t.join(dir)
}

#[test]
fn an_imported_pack_links_a_venv_without_compiling() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let venv_a = t.join("venv-a");
    make_venv(&python, &venv_a);
    let linked = link(&store_a, &python, &venv_a, &[]);
    let pycs = linked["pycs"].as_u64().unwrap();
    assert!(pycs > 300, "{linked}");
    assert_eq!(linked["compiled"], pycs, "{linked}");

    let pack = t.join("pycs.pack");
    let exported = json_ok(pycstore(&store_a).arg("export").arg(&pack));
    // A checked-hash entry per distinct source (the many empty
    // `__init__.py` are one); the body records that repeat them are not
    // counted, as in `stats`.
    let entries = exported["entries"].as_u64().unwrap();
    assert!(entries > pycs / 2 && entries <= pycs, "{exported}");
    assert_eq!(exported["skipped_entries"], 0, "{exported}");
    let objects = exported["objects"].as_u64().unwrap();
    assert!(objects > 0 && objects <= pycs, "{exported}");
    assert_eq!(
        exported["pack_bytes"],
        std::fs::metadata(&pack).unwrap().len(),
        "{exported}"
    );

    let imported = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(imported["entries_added"], entries, "{imported}");
    assert_eq!(imported["objects_added"], objects, "{imported}");
    assert_eq!(imported["objects_present"], 0, "{imported}");
    assert!(std::fs::read_dir(store_b.join("tmp"))
        .unwrap()
        .next()
        .is_none());

    // A new venv, a store that never compiled anything: all hits.
    let venv_b = t.join("venv-b");
    make_venv(&python, &venv_b);
    let linked = link(&store_b, &venv_b.join("bin/python"), &venv_b, &[]);
    assert_eq!(linked["compiled"], 0, "{linked}");
    assert_eq!(linked["hits"], pycs, "{linked}");
    let imports = "import pip._internal.cli.main, pip._internal.commands.install, \
                   pip._vendor.rich.console, pip._vendor.requests";
    let log = python_v(&venv_b.join("bin/python"), &["-c", imports], &[]);
    assert_nothing_compiled(&log, &venv_b, 100);

    // Importing again adds nothing.
    let again = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(again["entries_added"], 0, "{again}");
    assert_eq!(again["objects_added"], 0, "{again}");

    // Humans get one line.
    let out = run_ok(pycstore(&store_b).arg("import").arg(&pack));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!("imported 0 new entries (of {entries})")),
        "{stdout}"
    );
}

#[test]
fn a_damaged_pack_is_rejected_and_changes_nothing() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "exported", 40);
    link(&store_a, &python, &app, &[]);
    let pack = t.join("pycs.pack");
    run_ok(pycstore(&store_a).arg("export").arg(&pack));
    let bytes = std::fs::read(&pack).unwrap();
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());

    // Store B holds something of its own.
    let own = write_app(&t, "own", "store b's own", 3);
    link(&store_b, &python, &own, &[]);
    let before = snapshot(&store_b);

    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        (
            "short by one byte",
            bytes[..bytes.len() - 1].to_vec(),
            "truncated",
        ),
        ("flipped", flipped, "damaged"),
        (
            "garbage",
            b"GIF89a not a pack at all".repeat(40),
            "not a pycstore pack",
        ),
        ("empty", Vec::new(), "empty"),
    ];
    for (name, damaged, says) in cases {
        let path = t.write(format!("{name}.pack"), &damaged);
        let out = run(pycstore(&store_b).arg("import").arg(&path));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_output!(
            out,
            out.status.code() == Some(2)
                && stderr.contains(&format!("rejected the pack `{}`", path.display()))
                && stderr.contains(says)
                && stderr.contains("nothing was imported")
                && stderr.lines().count() == 1,
            "{name}: expected exit 2 and one line saying {says:?}"
        );
        assert!(
            snapshot(&store_b) == before,
            "{name}: importing a damaged pack changed the store"
        );
    }

    // The store still works, and the intact pack still imports.
    let imported = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(imported["entries_added"], 40, "{imported}");
    let copy = write_app(&t, "app-copy", "exported", 40);
    assert_eq!(link(&store_b, &python, &copy, &[])["compiled"], 0);
}

#[test]
fn python_selects_one_interpreters_entries() {
    let (py311, py312) = (python("3.11"), python("3.12"));
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "both", 5);
    run_ok(
        pycstore(&store_a)
            .args(["link", "--python"])
            .arg(&py311)
            .arg("--python")
            .arg(&py312)
            .arg(&app),
    );

    let pack = t.join("312.pack");
    let exported = json_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(&pack)
            .arg("--python")
            .arg(&py312),
    );
    assert_eq!(exported["entries"], 5, "{exported}");
    assert_eq!(exported["objects"], 5, "{exported}");
    run_ok(pycstore(&store_b).arg("import").arg(&pack));

    let copy = write_app(&t, "copy", "both", 5);
    assert_eq!(link(&store_b, &py311, &copy, &[])["compiled"], 5);
    let linked = link(&store_b, &py312, &copy, &[]);
    assert_eq!(linked["compiled"], 0, "{linked}");
    assert_eq!(linked["hits"], 5, "{linked}");

    // An interpreter the store has nothing for: an empty pack, and a warning.
    let out = run_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(t.join("310.pack"))
            .arg("--python")
            .arg(python("3.10")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds no pycs for"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("exported 0 entries"),
        "{out:?}"
    );
}

#[test]
fn an_object_gone_from_the_store_leaves_its_entries_out() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "evicted", 3);
    link(&store_a, &python, &app, &[]);
    // As if gc evicted one object after the index was read.
    let pyc = app.join("__pycache__/mod_0.cpython-311.pyc");
    let gone = std::fs::read(&pyc).unwrap();
    let object = walkdir::WalkDir::new(store_a.join("objects-v1"))
        .into_iter()
        .flatten()
        .find(|e| e.file_type().is_file() && std::fs::read(e.path()).unwrap() == gone)
        .expect("the pyc's object")
        .into_path();
    std::fs::remove_file(&object).unwrap();
    let name = object.file_name().unwrap().to_str().unwrap();

    let pack = t.join("pycs.pack");
    let out = run_ok(pycstore(&store_a).arg("export").arg(&pack));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(name) && stderr.contains("was removed after the index was read"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 entry left out"),
        "{out:?}"
    );
    let imported = json_ok(pycstore(&store_b).arg("import").arg(&pack));
    assert_eq!(imported["entries_added"], 2, "{imported}");
    let copy = write_app(&t, "copy", "evicted", 3);
    assert_eq!(link(&store_b, &python, &copy, &[])["compiled"], 1);
}

#[test]
fn prefix_selects_what_was_linked_there_with_its_bodies() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let one = write_app(&t, "one", "first app", 4);
    let two = write_app(&t, "two", "second app", 3);
    // Timestamp pycs: their entries name the source's mtime, so only the
    // body entries can serve a copy of the sources.
    link(
        &store_a,
        &python,
        &one,
        &["--invalidation-mode", "timestamp"],
    );
    link(&store_a, &python, &two, &[]);

    let pack = t.join("one.pack");
    let exported = json_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(&pack)
            .arg("--prefix")
            .arg(&one),
    );
    assert_eq!(exported["entries"], 4, "{exported}");
    assert_eq!(exported["objects"], 4, "{exported}");
    run_ok(pycstore(&store_b).arg("import").arg(&pack));

    let one_copy = write_app(&t, "one-copy", "first app", 4);
    let two_copy = write_app(&t, "two-copy", "second app", 3);
    let linked = link(&store_b, &python, &one_copy, &[]);
    assert_eq!(linked["compiled"], 0, "{linked}");
    assert_eq!(linked["hits"], 4, "{linked}");
    assert_eq!(link(&store_b, &python, &two_copy, &[])["compiled"], 3);

    // A prefix nothing was linked into: an empty pack, and a warning.
    let out = run_ok(
        pycstore(&store_a)
            .arg("export")
            .arg(t.join("none.pack"))
            .arg("--prefix")
            .arg(t.join("elsewhere")),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("records no pycs linked under"),
        "{out:?}"
    );
}

#[test]
fn dash_is_stdout_and_stdin() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "piped", 3);
    link(&store_a, &python, &app, &[]);

    let out = run_ok(pycstore(&store_a).args(["export", "-"]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exported 3 entries"),
        "{out:?}"
    );
    let pack = out.stdout;
    let mut import = pycstore(&store_b)
        .args(["import", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    import.stdin.take().unwrap().write_all(&pack).unwrap();
    let out: Output = import.wait_with_output().unwrap();
    assert_output!(out, out.status.success(), "import from stdin failed");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["entries_added"], 3, "{json}");

    // The pack and the JSON summary cannot share stdout.
    let out = run(pycstore(&store_a).args(["export", "-", "--json"]));
    assert_output!(
        out,
        out.status.code() == Some(2) && out.stdout.is_empty(),
        "expected a refusal"
    );
}

/// A pack made by hand, in the format `export` writes: a header declaring
/// at most (objects, object bytes, entries, failures), records, a trailer,
/// compressed and sealed. What it declares and holds is up to the test.
struct Crafted {
    zstd: zstd::Encoder<'static, Vec<u8>>,
    hash: blake3::Hasher,
}

impl Crafted {
    fn new(declared: [u64; 4]) -> Crafted {
        let mut pack = Crafted {
            zstd: zstd::Encoder::new(Vec::new(), 1).unwrap(),
            hash: blake3::Hasher::new(),
        };
        pack.put(b"pycstore pack\0");
        pack.put(&2u32.to_le_bytes());
        for n in declared {
            pack.put(&n.to_le_bytes());
        }
        pack
    }

    fn put(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        self.zstd.write_all(bytes).unwrap();
    }

    /// An object record whose length field says `len` and whose id is the
    /// blake3 of `bytes`.
    fn object(&mut self, bytes: &[u8]) {
        self.put(b"O");
        self.put(blake3::hash(bytes).as_bytes());
        self.put(&(bytes.len() as u64).to_le_bytes());
        self.put(bytes);
    }

    fn entry(&mut self, key: &[u8], value: &[u8]) {
        self.put(&[b'E', key.len() as u8]);
        self.put(key);
        self.put(&[value.len() as u8]);
        self.put(value);
    }

    /// The trailer (entries, failures, objects), the seal; the pack's bytes.
    fn finish(mut self, counts: [u64; 3]) -> Vec<u8> {
        self.put(b"T");
        for n in counts {
            self.put(&n.to_le_bytes());
        }
        let digest = self.hash.finalize();
        self.zstd.write_all(digest.as_bytes()).unwrap();
        let mut pack = self.zstd.finish().unwrap();
        let seal = blake3::hash(&pack);
        pack.extend_from_slice(&0x184d_2a50u32.to_le_bytes());
        pack.extend_from_slice(&32u32.to_le_bytes());
        pack.extend_from_slice(seal.as_bytes());
        pack
    }
}

/// The files in the store's `tmp/`.
fn tmp_files(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store.join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// `pycstore import` under a 512 MiB address-space limit: it must refuse
/// the pack cleanly, saying `says`, and change nothing.
fn assert_refused_within_512_mib(store: &Path, pack: &Path, says: &str) {
    let before = snapshot(store);
    let out = run(Command::new("prlimit")
        .arg(format!("--as={}", 512 << 20))
        .arg(env!("CARGO_BIN_EXE_pycstore"))
        .arg("--store")
        .arg(store)
        .arg("import")
        .arg(pack)
        .env_remove("PYCSTORE_DIR"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2)
            && stderr.contains(&format!("rejected the pack `{}`", pack.display()))
            && stderr.contains(says)
            && stderr.lines().count() == 1,
        "{}: expected exit 2 and one line saying {says:?}",
        pack.display()
    );
    assert!(
        snapshot(store) == before,
        "{}: changed the store",
        pack.display()
    );
    assert_eq!(
        tmp_files(store),
        Vec::<PathBuf>::new(),
        "{}",
        pack.display()
    );
}

#[test]
fn hostile_packs_are_refused_within_a_memory_limit_and_change_nothing() {
    let python = python("3.11");
    let t = TestDir::new();
    let store = t.join("store");
    let own = write_app(&t, "own", "the store's own", 3);
    link(&store, &python, &own, &[]);
    let zeros = vec![0u8; 1 << 20];

    // A tiny pack holding a 1 GiB object (zeros compress well), declared.
    let mut huge = Crafted::new([1, 1 << 30, 0, 0]);
    huge.put(b"O");
    huge.put(&[7; 32]);
    huge.put(&(1u64 << 30).to_le_bytes());
    for _ in 0..1024 {
        huge.put(&zeros);
    }
    let huge = huge.finish([0, 0, 1]);
    assert!(huge.len() < 256 << 10, "{} bytes", huge.len());
    let path = t.write("huge.pack", &huge);
    assert_refused_within_512_mib(&store, &path, "more than the 64 MiB pycstore accepts");

    // Its header declares 1 MiB of objects; the stream holds 60 MiB.
    let mut over = Crafted::new([1, 1 << 20, 0, 0]);
    over.object(&vec![1u8; 60 << 20]);
    let path = t.write("over.pack", over.finish([0, 0, 1]));
    assert_refused_within_512_mib(
        &store,
        &path,
        "exceed the 1048576 bytes its header declares",
    );

    // Honestly declared: 1 GiB in twenty 50 MiB objects that are no pycs.
    // At most 64 MiB of them are held at once, and none reaches tmp/.
    let mut many = Crafted::new([20, 20 * (50 << 20), 0, 0]);
    for i in 0..20u8 {
        let mut object = vec![0u8; 50 << 20];
        object[0] = i;
        many.object(&object);
    }
    let path = t.write("many.pack", many.finish([0, 0, 20]));
    assert_refused_within_512_mib(&store, &path, "does not start with a Python magic number");
}

#[test]
fn importing_a_directory_says_it_is_one() {
    let t = TestDir::new();
    let dir = t.join("packs");
    std::fs::create_dir_all(&dir).unwrap();
    let out = run(t.pycstore().arg("import").arg(&dir));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2)
            && stderr.contains(&format!("`{}` is a directory, not a pack", dir.display()))
            && !stderr.contains("zstd"),
        "expected a message saying it is a directory"
    );
}

/// A FIFO where the pack should be (a cache restored with one in its
/// place) is refused as a truncated pack at once: the import does not wait
/// for a writer that never comes. A pipe that is written is read.
#[test]
fn a_fifo_nothing_writes_is_refused_not_waited_on() {
    let t = TestDir::new();
    let fifo = t.join("pycs.pack");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let import = || {
        t.pycstore()
            .arg("import")
            .arg(&fifo)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = import();
    // Waited for at most 60 s: a hang fails the test instead of the run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("import of a FIFO nothing writes to is still waiting after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2) && stderr.contains(&fifo.display().to_string()),
        "expected exit 2 naming the FIFO"
    );
    assert!(tmp_files(&t.store()).is_empty());
    // A FIFO with a writer: read to its end. The writer (this process) holds
    // the FIFO open until the import has opened it too, then closes it.
    let pack = t.join("empty.pack");
    run_ok(t.pycstore().arg("export").arg(&pack));
    let bytes = std::fs::read(&pack).unwrap();
    assert!(bytes.len() < 64 << 10, "fits in the pipe's buffer");
    let mut writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    writer.write_all(&bytes).unwrap();
    let child = import();
    let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
    let opened = || {
        std::fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to == fifo))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !opened() {
        assert!(
            std::time::Instant::now() < deadline,
            "the import never opened the FIFO"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(writer);
    let out = child.wait_with_output().unwrap();
    assert_output!(out, out.status.success(), "a written FIFO is imported");
}

/// A pyc's header, the code type byte and garbage: what a pycache-prefix
/// mount once ingested.
fn header_and_garbage(pyc: &[u8]) -> Vec<u8> {
    let mut bytes = pyc[..16].to_vec();
    bytes.extend_from_slice(b"c\xde\xad\xbe\xef and garbage where the code object should be");
    bytes
}

#[test]
fn a_pack_whose_object_python_cannot_load_is_refused_and_never_linked() {
    let python = python("3.11");
    let t = TestDir::new();
    let (store_a, store_b) = (t.join("store-a"), t.join("store-b"));
    let app = write_app(&t, "app", "garbage", 1);
    link(&store_a, &python, &app, &[]);
    let pyc = std::fs::read(app.join("__pycache__/mod_0.cpython-311.pyc")).unwrap();

    // The pack carries store A's entries for mod_0, naming a garbage object
    // with the same header: whole, sealed, every hash right.
    let garbage = header_and_garbage(&pyc);
    let id = blake3::hash(&garbage);
    let mut value = id.as_bytes().to_vec();
    value.extend_from_slice(&(garbage.len() as u64).to_le_bytes());
    value.extend_from_slice(&garbage[..16]);
    let keys: Vec<Vec<u8>> = {
        let index = pycstore_store::index::Index::open(&store_a.join("index-v2")).unwrap();
        index
            .entries()
            .unwrap()
            .into_iter()
            .map(|(key, slot, _)| slot.encode_key(&key))
            .collect()
    };
    assert_eq!(keys.len(), 2, "a body and a checked-hash entry");
    let mut crafted = Crafted::new([1, garbage.len() as u64, 2, 0]);
    crafted.object(&garbage);
    for key in &keys {
        crafted.entry(key, &value);
    }
    let pack = t.write("garbage.pack", crafted.finish([2, 0, 1]));

    let own = write_app(&t, "own", "store b's own", 2);
    link(&store_b, &python, &own, &[]);
    let before = snapshot(&store_b);
    let out = run(pycstore(&store_b).arg("import").arg(&pack));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2)
            && stderr.contains(&format!("rejected the pack `{}`", pack.display()))
            && stderr.contains(&format!("the object {}", id.to_hex()))
            && stderr.contains("not a loadable CPython 3.11 code object"),
        "expected the object named as unloadable"
    );
    assert!(snapshot(&store_b) == before, "the store changed");

    // So link compiles, and Python imports the module.
    let copy = write_app(&t, "copy", "garbage", 1);
    let linked = link(&store_b, &python, &copy, &[]);
    assert_eq!(linked["compiled"], 1, "{linked}");
    let log = python_v(
        &python,
        &["-c", "import mod_0; print(mod_0.VALUE)"],
        &[("PYTHONPATH", copy.as_os_str())],
    );
    assert_nothing_compiled(&log, &copy, 1);
}
