//! All three invalidation modes and all three optimize levels, imported by a
//! real interpreter under `-O` and `-OO`.

use std::os::unix::fs::{FileExt, MetadataExt};

use crate::util::*;

const MODULE: &str = "\"\"\"A docstring, dropped at -OO.\"\"\"\n\
def f(x):\n    \"\"\"Doc.\"\"\"\n    assert x, 'asserts vanish at -O'\n    return x\n";

#[test]
fn every_flavor_and_optimize_level_imports() {
    let python = python("3.12");
    for (mode, flags) in [
        ("checked-hash", 3u8),
        ("unchecked-hash", 1),
        ("timestamp", 0),
    ] {
        let t = TestDir::new();
        t.write("app/pkg/__init__.py", "");
        t.write("app/pkg/mod.py", MODULE);
        t.write("app/pkg/plain.py", "VALUE = 42\n");
        let app = t.join("app");
        let (out, json) = link_json(
            t.pycstore()
                .args([
                    "link",
                    "--optimize",
                    "0,1,2",
                    "--invalidation-mode",
                    mode,
                    "--python",
                ])
                .arg(&python)
                .arg(&app),
        );
        assert_output!(out, out.status.success(), "{mode}: link failed");
        assert_eq!(json["pycs"], 9, "{json}");
        assert_eq!(json["failed"], 0, "{json}");

        let cache = app.join("pkg/__pycache__");
        for name in [
            "mod.cpython-312.pyc",
            "mod.cpython-312.opt-1.pyc",
            "mod.cpython-312.opt-2.pyc",
        ] {
            let bytes = std::fs::read(cache.join(name)).unwrap();
            assert_eq!(bytes[4], flags, "{mode}: flags of {name}");
        }
        // A module with no docstrings or asserts compiles alike at every
        // level: one object, one inode.
        let inode = |n: &str| std::fs::metadata(cache.join(n)).unwrap().ino();
        assert_eq!(
            inode("plain.cpython-312.pyc"),
            inode("plain.cpython-312.opt-2.pyc"),
            "{mode}"
        );
        assert_ne!(
            inode("mod.cpython-312.pyc"),
            inode("mod.cpython-312.opt-2.pyc"),
            "{mode}"
        );

        let path = [("PYTHONPATH", app.as_os_str())];
        let check = "import pkg.mod, pkg.plain, sys; \
                     print(sys.flags.optimize, pkg.mod.__doc__ is None, pkg.plain.VALUE)";
        for (flag, expect) in [
            (None, "0 False 42"),
            (Some("-O"), "1 False 42"),
            (Some("-OO"), "2 True 42"),
        ] {
            let mut args = Vec::new();
            args.extend(flag);
            args.extend(["-c", check]);
            let log = python_v(&python, &args, &path);
            assert_nothing_compiled(&log, &app, 3);
            assert_eq!(
                String::from_utf8_lossy(&log.output.stdout).trim(),
                expect,
                "{mode} {flag:?}"
            );
        }
    }
}

/// Asking for another flavor of something already compiled derives it from
/// the stored body: no compile.
#[test]
fn a_new_flavor_reuses_the_compiled_body() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("a/m.py", MODULE);
    t.write("b/m.py", MODULE);
    let (_, json) = link_json(
        t.pycstore()
            .args(["link", "--python"])
            .arg(&python)
            .arg(t.join("a")),
    );
    assert_eq!(json["compiled"], 1, "{json}");
    let (_, json) = link_json(
        t.pycstore()
            .args(["link", "--invalidation-mode", "unchecked-hash", "--python"])
            .arg(&python)
            .arg(t.join("b")),
    );
    assert_eq!(
        (json["compiled"].as_u64(), json["hits"].as_u64()),
        (Some(0), Some(1)),
        "{json}"
    );
    let b = t.join("b");
    let log = python_v(
        &python,
        &["-c", "import m"],
        &[("PYTHONPATH", b.as_os_str())],
    );
    assert_nothing_compiled(&log, &b, 1);
}

/// A prefix linked again in another invalidation mode gets that mode's
/// pycs, and back; a timestamp pyc follows its source's mtime. What a link
/// recorded of a pyc spares the next run the entry lookup only for the very
/// entry it placed: the compile key, the mode, and for a timestamp pyc the
/// source's mtime and size.
#[test]
fn a_relink_in_another_mode_or_after_a_touch_replaces_the_pyc() {
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/m.py", MODULE);
    let app = t.join("app");
    let source = app.join("m.py");
    let pyc = app.join("__pycache__/m.cpython-311.pyc");
    let link = |mode: &str| {
        let (out, json) = link_json(
            t.pycstore()
                .args(["link", "--invalidation-mode", mode, "--python"])
                .arg(&python)
                .arg(&app),
        );
        assert_output!(out, out.status.success(), "link {mode}");
        assert_eq!(json["failed"], 0, "{json}");
        json
    };
    let header = || std::fs::read(&pyc).unwrap()[4..16].to_vec();
    let word = |h: &[u8], at: usize| u32::from_le_bytes(h[at..at + 4].try_into().unwrap());

    assert_eq!(link("checked-hash")["compiled"], 1);
    assert_eq!(header()[0], 3);
    assert_eq!(link("checked-hash")["up_to_date"], 1);
    for (mode, flags) in [("unchecked-hash", 1), ("checked-hash", 3)] {
        let json = link(mode);
        assert_eq!(json["up_to_date"], 0, "{mode}: {json}");
        assert_eq!(header()[0], flags, "{mode}");
        assert_eq!(link(mode)["up_to_date"], 1, "{mode}");
    }

    let json = link("timestamp");
    assert_eq!(json["up_to_date"], 0, "{json}");
    let mtime = |path: &std::path::Path| std::fs::metadata(path).unwrap().mtime() as u32;
    assert_eq!((header()[0], word(&header(), 4)), (0, mtime(&source)));
    // The same bytes, another mtime: the same compile key, another pyc.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(100);
    std::fs::File::options()
        .write(true)
        .open(&source)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let json = link("timestamp");
    assert_eq!(json["up_to_date"], 0, "{json}");
    assert_eq!(word(&header(), 4), mtime(&source));
    let log = python_v(
        &python,
        &["-c", "import m"],
        &[("PYTHONPATH", app.as_os_str())],
    );
    assert_nothing_compiled(&log, &app, 1);
}

/// A pyc written to through its hard link (made writable, changed, made
/// read-only again: the object's inode, so the store's object too) is not
/// taken for up to date by the next link, though its record still names
/// that inode: the write broke the object's seal (its mtime). That link
/// finds the store's object damaged and writes it again, so the store is
/// whole right after, and another prefix gets the good pyc.
#[test]
fn a_pyc_written_through_its_hard_link_is_not_up_to_date() {
    use std::os::unix::fs::PermissionsExt;
    let python = python("3.11");
    let t = TestDir::new();
    t.write("app/m.py", MODULE);
    t.write("other/m.py", MODULE);
    let link = |dir: &str| {
        let (out, json) = link_json(
            t.pycstore()
                .args(["link", "--python"])
                .arg(&python)
                .arg(t.join(dir)),
        );
        assert_output!(out, out.status.success(), "link {dir}");
        (out, json)
    };
    let pyc = t.join("app/__pycache__/m.cpython-311.pyc");
    assert_eq!(link("app").1["compiled"], 1);
    assert_eq!(link("app").1["up_to_date"], 1);
    let good = std::fs::read(&pyc).unwrap();
    let inode = std::fs::metadata(&pyc).unwrap().ino();
    // Same size, same header, a changed body.
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let set_mode = |mode| std::fs::set_permissions(&pyc, std::fs::Permissions::from_mode(mode));
    set_mode(0o644).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pyc)
        .unwrap()
        .write_all_at(&bad, 0)
        .unwrap();
    set_mode(0o444).unwrap();
    assert_eq!(std::fs::metadata(&pyc).unwrap().ino(), inode);

    let (out, json) = link("app");
    assert_eq!(json["up_to_date"], 0, "{json}");
    assert_output!(
        out,
        String::from_utf8_lossy(&out.stderr).contains("does not hash to its name"),
        "the damaged object is reported"
    );
    let verify = t.pycstore().arg("verify").output().unwrap();
    assert_output!(verify, verify.status.success(), "verify right after");
    let (_, json) = link("other");
    assert_eq!(json["compiled"], 0, "{json}");
    let other = t.join("other/__pycache__/m.cpython-311.pyc");
    assert_eq!(std::fs::read(&other).unwrap(), good);
    assert_ne!(std::fs::metadata(&other).unwrap().ino(), inode);
    let log = python_v(
        &python,
        &["-c", "import m; print(m.f(5))"],
        &[("PYTHONPATH", t.join("other").as_os_str())],
    );
    assert_nothing_compiled(&log, &t.join("other"), 1);
    assert_eq!(String::from_utf8_lossy(&log.output.stdout).trim(), "5");
}
