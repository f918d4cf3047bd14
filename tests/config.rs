//! The config file, its precedence under the environment and flags, and
//! the generated help: completions, man pages, `--version`.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::util::{python, run, TestDir};

/// The binary with no store flag, no config and no settings from the
/// environment, HOME and XDG dirs inside the test dir.
fn bare(t: &TestDir) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pycstore"));
    for var in [
        "PYCSTORE_DIR",
        "PYCSTORE_CONFIG",
        "PYCSTORE_LINK_MODE",
        "PYCSTORE_JOBS",
        "PYCSTORE_INVALIDATION_MODE",
        "PYCSTORE_EXCLUDE",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", t.join("home"));
    cmd.env("XDG_CONFIG_HOME", t.join("xdg-config"));
    cmd
}

fn config_json(cmd: &mut Command) -> serde_json::Value {
    let out = run(cmd.args(["config", "--json"]));
    assert_output!(out, out.status.success(), "pycstore config failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn write_default_config(t: &TestDir, text: &str) -> std::path::PathBuf {
    t.write("xdg-config/pycstore/config.toml", text)
}

#[test]
fn no_file_is_defaults() {
    let t = TestDir::new();
    let json = config_json(&mut bare(&t));
    assert_eq!(json["config_file"]["found"], json!(false));
    let s = &json["settings"];
    assert_eq!(
        s["link-mode"],
        json!({"value": "auto", "source": "default"})
    );
    assert_eq!(s["invalidation-mode"]["value"], json!("checked-hash"));
    assert_eq!(
        s["store"]["value"],
        json!(t.join("home/.cache/pycstore").display().to_string())
    );
    assert_eq!(s["exclude"]["value"], json!([]));
}

#[test]
fn flags_then_environment_then_file_then_defaults() {
    let t = TestDir::new();
    let file = write_default_config(
        &t,
        "# settings\nstore = \"~/stores/main\"\nlink-mode = \"copy\"\njobs = 3\n\
         invalidation-mode = \"unchecked-hash\"\nexclude = [\"skipme\"]\nremote = [\"file:///srv/pycs\"]\n",
    );
    let file_s = file.display().to_string();

    let json = config_json(&mut bare(&t));
    let s = &json["settings"];
    assert_eq!(json["config_file"]["found"], json!(true));
    assert_eq!(
        s["store"],
        json!({"value": t.join("home/stores/main").display().to_string(), "source": "file", "file": file_s, "line": 2})
    );
    assert_eq!(
        s["link-mode"],
        json!({"value": "copy", "source": "file", "file": file_s, "line": 3})
    );
    assert_eq!(s["jobs"]["value"], json!(3));
    assert_eq!(s["invalidation-mode"]["line"], json!(5));
    assert_eq!(s["exclude"]["value"], json!(["skipme"]));
    assert_eq!(s["remote"]["value"], json!(["file:///srv/pycs"]));

    // The environment over the file.
    let json = config_json(
        bare(&t)
            .env("PYCSTORE_JOBS", "5")
            .env("PYCSTORE_LINK_MODE", "hardlink")
            .env("PYCSTORE_EXCLUDE", "a b/**")
            .env("PYCSTORE_DIR", t.join("env-store")),
    );
    let s = &json["settings"];
    assert_eq!(
        s["jobs"],
        json!({"value": 5, "source": "env", "env": "PYCSTORE_JOBS"})
    );
    assert_eq!(s["link-mode"]["value"], json!("hardlink"));
    assert_eq!(s["exclude"]["value"], json!(["a", "b/**"]));
    assert_eq!(s["store"]["source"], json!("env"));

    // The flag over the environment.
    let json = config_json(
        bare(&t)
            .env("PYCSTORE_DIR", t.join("env-store"))
            .arg("--store")
            .arg(t.join("flag-store")),
    );
    assert_eq!(
        json["settings"]["store"],
        json!({"value": t.join("flag-store").display().to_string(), "source": "flag", "flag": "--store"})
    );

    // The text form says where each came from, as TOML comments.
    let out = run(bare(&t).env("PYCSTORE_JOBS", "5").arg("config"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_output!(
        out,
        out.status.success()
            && text.contains(&format!(
                "link-mode           = \"copy\"                     # file {file_s}:3"
            ))
            && text.contains("# environment PYCSTORE_JOBS"),
        "config text"
    );
}

#[test]
fn link_uses_the_file_unless_a_flag_says_otherwise() {
    let t = TestDir::new();
    let py = python("3.11");
    write_default_config(
        &t,
        &format!(
            "store = \"{}\"\nlink-mode = \"copy\"\nexclude = [\"skipme\"]\njobs = 1\n",
            t.store().display()
        ),
    );
    t.write("src/pkg/mod.py", "X = 1\n");
    t.write("src/skipme/other.py", "Y = 2\n");
    let link = |extra: &[&str]| {
        let mut cmd = bare(&t);
        cmd.arg("link")
            .arg("--python")
            .arg(&py)
            .arg(t.join("src"))
            .arg("--json");
        cmd.args(extra);
        let out = run(&mut cmd);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
        (out, json)
    };
    let (out, json) = link(&[]);
    assert_output!(
        out,
        out.status.success()
            && json["sources"] == json!(1)
            && json["link_modes"] == json!(["copy"]),
        "the file's store, link mode and excludes: {json}"
    );
    assert!(t.store().join("objects-v1").is_dir());
    assert!(!t.join("src/skipme/__pycache__").exists());

    std::fs::remove_dir_all(t.join("src/pkg/__pycache__")).unwrap();
    let (out, json) = link(&["--link-mode", "hardlink", "--exclude", "nothing"]);
    assert_output!(
        out,
        out.status.success()
            && json["sources"] == json!(2)
            && json["link_modes"] == json!(["hardlink"]),
        "flags replace the file's link mode and excludes: {json}"
    );
}

fn assert_exit2(cmd: &mut Command, expect: &[&str]) {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_output!(
        out,
        out.status.code() == Some(2) && expect.iter().all(|e| err.contains(e)),
        "expected exit 2 with {expect:?}"
    );
}

#[test]
fn bad_files_stop_every_command_naming_file_line_and_key() {
    let t = TestDir::new();
    let file = write_default_config(&t, "jobs = 2\n\n[link]\nmode = \"copy\"\n");
    let f = file.display().to_string();
    assert_exit2(
        bare(&t).arg("stats"),
        &[&format!("{f}:3: unknown key `link`")],
    );

    write_default_config(&t, "jobs = 2\nlink_mode = \"copy\"\n");
    assert_exit2(
        bare(&t).arg("config"),
        &[&format!(
            "{f}:2: unknown key `link_mode` (did you mean `link-mode`?)"
        )],
    );

    write_default_config(&t, "store = \"/x\"\njobs = = 2\n");
    assert_exit2(bare(&t).arg("config"), &[&format!("{f}:2: not valid TOML")]);

    write_default_config(&t, "jobs = \"four\"\n");
    assert_exit2(
        bare(&t).arg("config"),
        &[&format!("{f}:1: `jobs` must be an integer, not string")],
    );

    write_default_config(&t, "link-mode = \"sideways\"\n");
    assert_exit2(
        bare(&t).arg("config"),
        &[&format!(
            "{f}:1: `link-mode` `sideways` is not one of auto, reflink, hardlink, copy"
        )],
    );

    // A bad variable is as bad as a bad file.
    std::fs::remove_file(&file).unwrap();
    assert_exit2(
        bare(&t).env("PYCSTORE_JOBS", "0").arg("config"),
        &["PYCSTORE_JOBS"],
    );
}

#[test]
fn a_named_file_must_exist_the_default_need_not() {
    let t = TestDir::new();
    let missing = t.join("nowhere.toml");
    assert_exit2(
        bare(&t).env("PYCSTORE_CONFIG", &missing).arg("config"),
        &[&format!(
            "cannot read the config file `{}` (named by PYCSTORE_CONFIG)",
            missing.display()
        )],
    );
    let dir = t.join("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    assert_exit2(
        bare(&t).env("PYCSTORE_CONFIG", &dir).arg("config"),
        &["cannot read the config file"],
    );

    let named = t.write("named.toml", "jobs = 7\n");
    let json = config_json(bare(&t).env("PYCSTORE_CONFIG", &named));
    assert_eq!(json["config_file"]["from_env"], json!(true));
    assert_eq!(json["settings"]["jobs"]["value"], json!(7));

    // /dev/null: no settings.
    write_default_config(&t, "jobs = 9\n");
    let json = config_json(bare(&t).env("PYCSTORE_CONFIG", "/dev/null"));
    assert_eq!(json["settings"]["jobs"]["source"], json!("default"));
}

#[test]
fn completions_man_pages_and_version() {
    let t = TestDir::new();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef pycstore"),
        ("fish", "complete -c pycstore"),
    ] {
        let out = run(bare(&t).args(["completions", shell]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_output!(
            out,
            out.status.success() && text.contains(marker) && text.contains("link"),
            "{shell} completions"
        );
    }
    let out = run(bare(&t).arg("man"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_output!(
        out,
        out.status.success() && text.contains(".TH pycstore 1"),
        "man page"
    );

    let dir = t.join("man1");
    let out = run(bare(&t).arg("man").arg("--dir").arg(&dir));
    assert_output!(out, out.status.success(), "man --dir");
    for page in [
        "pycstore.1",
        "pycstore-link.1",
        "pycstore-config.1",
        "pycstore-gc.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".SH"), "{page}: {text}");
    }
    assert!(Path::new(&dir.join("pycstore-link.1")).exists());
    assert!(std::fs::read_to_string(dir.join("pycstore-link.1"))
        .unwrap()
        .contains("link\\-mode"));

    let out = run(bare(&t).arg("--version"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_output!(
        out,
        out.status.success()
            && text.starts_with(&format!("pycstore {} (commit ", env!("CARGO_PKG_VERSION")))
            && text.contains(", RocksDB 7."),
        "--version names the version, the commit and RocksDB"
    );
}

/// The file's remotes reach `link`: a second store with the same file
/// links from the first one's uploads without compiling; read-only from the
/// file uploads nothing.
#[test]
fn the_files_remotes_reach_link() {
    let t = TestDir::new();
    let py = python("3.11");
    let remote = t.join("remote");
    std::fs::create_dir(&remote).unwrap();
    t.write("src/pkg/mod.py", "X = 1\n");
    let link = |store: &str, config: &str| {
        let file = t.write(format!("{store}.toml"), config);
        let mut cmd = bare(&t);
        cmd.env("PYCSTORE_CONFIG", &file)
            .env_remove("PYCSTORE_REMOTE")
            .env_remove("PYCSTORE_REMOTE_READ_ONLY")
            .arg("--store")
            .arg(t.join(store))
            .args(["link", "--json", "--python"])
            .arg(&py)
            .arg(t.join("src"));
        let out = run(&mut cmd);
        assert_output!(out, out.status.success(), "link with {config} failed");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        std::fs::remove_dir_all(t.join("src/pkg/__pycache__")).unwrap();
        json
    };
    let url = format!("file://{}", remote.display());
    let read_only = link(
        "a",
        &format!("remote = [\"{url}\"]\nremote-read-only = true\n"),
    );
    assert_eq!(read_only["compiled"], json!(1), "{read_only}");
    assert_eq!(
        walkdir::WalkDir::new(&remote)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .count(),
        0,
        "read-only uploaded: {read_only}"
    );
    let first = link("b", &format!("remote = [\"{url}\"]\n"));
    assert_eq!(first["compiled"], json!(1), "{first}");
    let second = link("c", &format!("remote = [\"{url}\"]\n"));
    assert_eq!(second["compiled"], json!(0), "{second}");
    assert_eq!(second["fetched"], json!(1), "{second}");
}

/// Every remote setting of the file reaches `link`, as `pycstore config`
/// says it does: the namespace, the signing key and the trusted keys (a
/// reader trusting another key rejects the entries and compiles); the
/// environment still goes over the file.
#[test]
fn the_files_remote_settings_reach_link() {
    let t = TestDir::new();
    let py = python("3.11");
    let remote = t.join("remote");
    std::fs::create_dir(&remote).unwrap();
    t.write("src/pkg/mod.py", "X = 1\n");
    // keygen makes the directory it is told to write into (in HOME, so that
    // the file names the public keys as `~/keys/NAME.pub`).
    for name in ["ci", "other"] {
        let out = run(bare(&t)
            .args(["keygen", name, "--dir"])
            .arg(t.join("home/keys")));
        assert_output!(out, out.status.success(), "keygen {name}");
    }
    let url = format!("file://{}", remote.display());
    let link = |store: &str, config: &str, envs: &[(&str, &str)]| {
        let file = t.write(format!("{store}.toml"), config);
        let mut cmd = bare(&t);
        cmd.env("PYCSTORE_CONFIG", &file);
        for var in [
            "PYCSTORE_REMOTE",
            "PYCSTORE_REMOTE_READ_ONLY",
            "PYCSTORE_REMOTE_NAMESPACE",
            "PYCSTORE_REMOTE_SIGNING_KEY",
            "PYCSTORE_REMOTE_TRUSTED_KEYS",
            "PYCSTORE_REMOTE_TIMEOUT",
            "PYCSTORE_REMOTE_JOBS",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.arg("--store")
            .arg(t.join(store))
            .args(["link", "--json", "--python"])
            .arg(&py)
            .arg(t.join("src"));
        let out = run(&mut cmd);
        assert_output!(out, out.status.success(), "link with {config} failed");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        std::fs::remove_dir_all(t.join("src/pkg/__pycache__")).unwrap();
        json
    };
    let ns_dir = |ns: &str| remote.join("pycstore-v1").join(ns);
    let writer = format!(
        "remote = [\"{url}\"]\nremote-namespace = \"proj\"\nremote-signing-key = \"{}\"\n\
         remote-timeout = 5\nremote-jobs = 4\n",
        t.join("home/keys/ci.secret").display()
    );
    let first = link("a", &writer, &[]);
    assert_eq!(first["compiled"], json!(1), "{first}");
    assert!(ns_dir("proj").is_dir(), "the file's namespace was not used");
    assert!(!ns_dir("default").exists());

    let reader = |keys: &str| {
        format!(
            "remote = [\"{url}\"]\nremote-namespace = \"proj\"\nremote-trusted-keys = \
             [\"~/keys/{keys}\"]\nremote-read-only = true\n",
        )
    };
    // Signed by `ci`: a reader trusting only `other` rejects it.
    let rejected = link("b", &reader("other.pub"), &[]);
    assert_eq!(rejected["compiled"], json!(1), "{rejected}");
    let trusted = link("c", &reader("ci.pub"), &[]);
    assert_eq!(trusted["compiled"], json!(0), "{trusted}");
    assert_eq!(trusted["fetched"], json!(1), "{trusted}");

    // The environment over the file: another namespace, where nothing is.
    let other = link(
        "d",
        &reader("ci.pub"),
        &[("PYCSTORE_REMOTE_NAMESPACE", "elsewhere")],
    );
    assert_eq!(other["compiled"], json!(1), "{other}");
    assert_eq!(other["fetched"], json!(0), "{other}");
    // Read-only from the file, so nothing was written there either.
    assert!(!ns_dir("elsewhere").exists());
}

/// The file's remotes reach `status` as they reach `link`: a fresh store
/// counts what the file's remote would give, and nothing without the file.
#[test]
fn the_files_remotes_reach_status() {
    let t = TestDir::new();
    let py = python("3.11");
    let remote = t.join("remote");
    std::fs::create_dir(&remote).unwrap();
    t.write("src/pkg/mod.py", "X = 1\n");
    t.write("src/pkg/other.py", "Y = 2\n");
    let file = t.write(
        "with.toml",
        format!("remote = [\"file://{}\"]\n", remote.display()),
    );
    let with = |store: &str, config: &Path, sub: &str| {
        let mut cmd = bare(&t);
        cmd.env("PYCSTORE_CONFIG", config)
            .env_remove("PYCSTORE_REMOTE")
            .env_remove("PYCSTORE_REMOTE_READ_ONLY")
            .arg("--store")
            .arg(t.join(store))
            .args([sub, "--json", "--python"])
            .arg(&py)
            .arg(t.join("src"));
        let out = run(&mut cmd);
        assert_output!(out, out.status.success(), "{sub} with {config:?} failed");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let linked = with("a", &file, "link");
    assert_eq!(linked["compiled"], json!(2), "{linked}");
    std::fs::remove_dir_all(t.join("src/pkg/__pycache__")).unwrap();
    let counts = |v: &serde_json::Value| {
        let map = v["interpreters"].as_object().unwrap().clone();
        assert_eq!(map.len(), 1, "{v}");
        map.into_iter().next().unwrap().1
    };
    let status = with("b", &file, "status");
    assert_eq!(counts(&status)["missing"], json!(2), "{status}");
    assert_eq!(counts(&status)["from_remote"], json!(2), "{status}");
    let status = with("b", Path::new("/dev/null"), "status");
    assert_eq!(counts(&status)["from_remote"], json!(0), "{status}");
}
