//! The remote tier against real servers on loopback: Redis (Debian's
//! redis-server), WebDAV (Debian's nginx with `dav_methods PUT`), S3
//! (Garage, single node) and a `file://` directory. `scripts/test-servers
//! up` starts the servers and names them in `PYCSTORE_TEST_REDIS`,
//! `PYCSTORE_TEST_WEBDAV*` and `PYCSTORE_TEST_S3_*`; without them a test
//! says SKIPPED, unless `CI` or `PYCSTORE_TEST_REQUIRE_SERVERS` is set, when
//! it fails (see `util::skip`). Each test works in a namespace of its own,
//! so tests share the servers.
//!
//! The FUSE views ask the same remotes on first access: those tests also
//! need what `tests/fuse.rs` needs (root, /dev/fuse, fusermount3).
//!
//! Machines are simulated by stores: a second, empty store is another
//! machine. Servers that stop, hang or die mid-run are simulated by a TCP
//! proxy in front of the real one.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::fuse::{
    assert_served_by_prefix, fuse_available, reported, tree_hash, venv_python, Mounted, ReadOnly,
    PIP_IMPORTS,
};
use crate::util::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Redis,
    Webdav,
    S3,
}

/// A remote under test, in a namespace of its own.
struct Backend {
    kind: Kind,
    url: String,
    env: Vec<(String, String)>,
    namespace: String,
    /// Where a file:// remote or the WebDAV server keeps what it stores.
    disk: Option<PathBuf>,
    _dir: Option<TestDir>,
}

fn skip_server(why: &str) -> Option<Backend> {
    assert!(
        std::env::var_os("PYCSTORE_TEST_REQUIRE_SERVERS").is_none(),
        "{why}, and PYCSTORE_TEST_REQUIRE_SERVERS is set"
    );
    // Fails under CI.
    skip(&format!("{why}: run `eval \"$(scripts/test-servers up)\"`"));
    None
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn namespace() -> String {
    format!("t{:016x}", fastrand_u64())
}

fn fastrand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

impl Backend {
    fn get(kind: Kind) -> Option<Backend> {
        let mut b = Backend {
            kind,
            url: String::new(),
            env: Vec::new(),
            namespace: namespace(),
            disk: None,
            _dir: None,
        };
        match kind {
            Kind::File => {
                let dir = TestDir::new();
                b.url = format!("file://{}", dir.path().display());
                b.disk = Some(dir.path().to_path_buf());
                b._dir = Some(dir);
            }
            Kind::Redis => {
                let Some(url) = var("PYCSTORE_TEST_REDIS") else {
                    return skip_server("PYCSTORE_TEST_REDIS is not set");
                };
                b.url = url;
            }
            Kind::Webdav => {
                let (Some(url), Some(token), Some(root)) = (
                    var("PYCSTORE_TEST_WEBDAV"),
                    var("PYCSTORE_TEST_WEBDAV_TOKEN"),
                    var("PYCSTORE_TEST_WEBDAV_ROOT"),
                ) else {
                    return skip_server("PYCSTORE_TEST_WEBDAV* are not set");
                };
                b.url = url;
                b.env.push(("PYCSTORE_REMOTE_HTTP_TOKEN".into(), token));
                b.disk = Some(PathBuf::from(root));
            }
            Kind::S3 => {
                let names = [
                    "BUCKET",
                    "ENDPOINT",
                    "REGION",
                    "ACCESS_KEY_ID",
                    "SECRET_ACCESS_KEY",
                ];
                let values: Vec<_> = names
                    .iter()
                    .map(|n| var(&format!("PYCSTORE_TEST_S3_{n}")))
                    .collect();
                if values.iter().any(Option::is_none) {
                    return skip_server("PYCSTORE_TEST_S3_* are not set");
                }
                let v: Vec<String> = values.into_iter().map(Option::unwrap).collect();
                b.url = format!("s3://{}/ci", v[0]);
                b.env = vec![
                    ("AWS_ENDPOINT_URL".into(), v[1].clone()),
                    ("AWS_REGION".into(), v[2].clone()),
                    ("AWS_ACCESS_KEY_ID".into(), v[3].clone()),
                    ("AWS_SECRET_ACCESS_KEY".into(), v[4].clone()),
                ];
            }
        }
        Some(b)
    }

    /// `pycstore --store STORE SUB` with the remote's environment.
    fn cmd(&self, store: &Path, sub: &str) -> Command {
        let mut cmd = pycstore(store);
        for var in [
            "PYCSTORE_REMOTE",
            "PYCSTORE_REMOTE_READ_ONLY",
            "PYCSTORE_REMOTE_SIGNING_KEY",
            "PYCSTORE_REMOTE_TRUSTED_KEYS",
            "PYCSTORE_REMOTE_HTTP_TOKEN",
            "PYCSTORE_REMOTE_HTTP_USER",
            "PYCSTORE_REMOTE_HTTP_PASSWORD",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg(sub)
            .arg("--remote")
            .arg(&self.url)
            .arg("--remote-namespace")
            .arg(&self.namespace);
        cmd
    }

    /// `pycstore link` of `prefix` for CPython 3.11 with this remote.
    fn link(&self, store: &Path, prefix: &Path, extra: &[&str]) -> (Output, Value) {
        let mut cmd = self.cmd(store, "link");
        cmd.arg(prefix)
            .arg("--python")
            .arg(python("3.11"))
            .args(extra);
        link_json(&mut cmd)
    }

    /// `pycstore mount ARGS` with this remote, until the mount is up.
    fn mount(&self, t: &TestDir, store: &Path, mountpoint: &Path, args: &[&OsStr]) -> Mounted {
        let mut cmd = self.cmd(store, "mount");
        cmd.args(args);
        Mounted::spawn(t, cmd, store, mountpoint)
    }

    /// `pycstore status --json` of `prefix` for CPython 3.11 with this
    /// remote: the report, and what was said on stderr.
    fn status(&self, store: &Path, prefix: &Path, extra: &[&str]) -> (Value, Vec<String>) {
        let mut cmd = self.cmd(store, "status");
        cmd.arg(prefix)
            .arg("--python")
            .arg(python("3.11"))
            .arg("--json")
            .args(extra);
        let out = run_ok(&mut cmd);
        (serde_json::from_slice(&out.stdout).unwrap(), warnings(&out))
    }

    /// The port of a network remote.
    fn port(&self) -> u16 {
        let endpoint = match self.kind {
            Kind::S3 => self.env[0].1.clone(),
            _ => self.url.clone(),
        };
        let after = endpoint.rsplit_once("127.0.0.1:").unwrap().1;
        after
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    }

    /// The same remote reached at another port of loopback.
    fn at_port(&self, port: u16) -> Backend {
        let old = format!("127.0.0.1:{}", self.port());
        let new = format!("127.0.0.1:{port}");
        Backend {
            kind: self.kind,
            url: self.url.replace(&old, &new),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.replace(&old, &new)))
                .collect(),
            namespace: self.namespace.clone(),
            disk: self.disk.clone(),
            _dir: None,
        }
    }

    /// The same remote with its credentials made wrong.
    fn with_wrong_credentials(&self) -> Backend {
        let mut b = self.at_port(self.port());
        match self.kind {
            Kind::Redis => {
                let (head, tail) = b.url.split_once('@').unwrap();
                b.url = format!("{head}x@{tail}");
            }
            Kind::Webdav => b.env[0].1.push('x'),
            Kind::S3 => b.env[3].1.push('x'),
            Kind::File => unreachable!(),
        }
        b
    }

    /// What the remote stores under this test's namespace: names relative
    /// to the remote's root.
    fn stored(&self) -> Vec<String> {
        let prefix = format!("pycstore-v1/{}/", self.namespace);
        let mut names = match self.kind {
            Kind::File | Kind::Webdav => {
                let root = self.disk.clone().unwrap();
                walkdir::WalkDir::new(root.join(&prefix))
                    .into_iter()
                    .flatten()
                    .filter(|e| e.file_type().is_file())
                    .map(|e| {
                        e.path()
                            .strip_prefix(&root)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned()
                    })
                    .filter(|n| !n.contains("/.tmp/"))
                    .collect()
            }
            Kind::Redis => redis(&self.url, &["KEYS", &format!("*{prefix}*")])
                .into_iter()
                .map(|k| String::from_utf8(k).unwrap())
                .collect(),
            Kind::S3 => self.client().raw_list(0, &prefix).unwrap(),
        };
        names.sort();
        names
    }

    fn read(&self, name: &str) -> Vec<u8> {
        match self.kind {
            Kind::File | Kind::Webdav => {
                std::fs::read(self.disk.clone().unwrap().join(name)).unwrap()
            }
            Kind::Redis => redis(&self.url, &["GET", name]).pop().unwrap(),
            Kind::S3 => self.client().raw_read(0, name).unwrap(),
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        match self.kind {
            Kind::File | Kind::Webdav => {
                let path = self.disk.clone().unwrap().join(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, bytes).unwrap()
            }
            Kind::Redis => {
                redis_bytes(&self.url, &[b"SET", name.as_bytes(), bytes]);
            }
            Kind::S3 => self.client().raw_write(0, name, bytes.to_vec()).unwrap(),
        }
    }

    /// Puts something that is not a record under the record name `name`:
    /// a directory (a file or WebDAV remote), a list (Redis), a name under
    /// it (S3, which has no directories: the name itself is then missing).
    /// Whether a reader finds something there to reject.
    fn put_not_a_record(&self, name: &str) -> bool {
        match self.kind {
            Kind::File | Kind::Webdav => {
                let path = self.disk.clone().unwrap().join(name);
                std::fs::remove_file(&path).unwrap();
                std::fs::create_dir(&path).unwrap();
                std::fs::write(path.join("x"), b"x").unwrap();
                true
            }
            Kind::Redis => {
                redis(&self.url, &["DEL", name]);
                redis(&self.url, &["RPUSH", name, "x"]);
                true
            }
            Kind::S3 => {
                let client = self.client();
                client
                    .raw_write(0, &format!("{name}/x"), b"x".to_vec())
                    .unwrap();
                client.raw_delete(0, name).unwrap();
                false
            }
        }
    }

    /// A client of the store crate, to play a writer by hand (S3).
    fn client(&self) -> pycstore_store::remote::Remotes {
        use pycstore_store::remote::{Remotes, Requested, Settings};
        let env = |name: &str| {
            self.env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let requested = Requested {
            urls: vec![self.url.clone()],
            timeout_secs: 10.0,
            namespace: self.namespace.clone(),
            concurrency: 8,
            ..Requested::default()
        };
        Remotes::new(Settings::resolve(&requested, &env).unwrap().unwrap()).unwrap()
    }
}

/// A minimal Redis client (RESP) for the tests to look at what Redis holds.
fn redis(url: &str, args: &[&str]) -> Vec<Vec<u8>> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    redis_bytes(url, &args)
}

fn redis_bytes(url: &str, args: &[&[u8]]) -> Vec<Vec<u8>> {
    let rest = url.strip_prefix("redis://").unwrap();
    let (auth, host) = rest.split_once('@').unwrap();
    let (user, pass) = auth.split_once(':').unwrap();
    let host = host.split('/').next().unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    let mut send = |args: &[&[u8]]| {
        let mut m = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            m.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            m.extend_from_slice(a);
            m.extend_from_slice(b"\r\n");
        }
        s.write_all(&m).unwrap();
    };
    send(&[b"AUTH", user.as_bytes(), pass.as_bytes()]);
    send(args);
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    let mut values = Vec::new();
    fn line(r: &mut impl std::io::BufRead) -> String {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }
    fn value(r: &mut impl std::io::BufRead, out: &mut Vec<Vec<u8>>) {
        let l = line(r);
        match &l[..1] {
            "+" | ":" => out.push(l.as_bytes()[1..].to_vec()),
            "-" => panic!("redis error: {l}"),
            "$" => {
                let n: i64 = l[1..].parse().unwrap();
                if n >= 0 {
                    let mut b = vec![0; n as usize + 2];
                    r.read_exact(&mut b).unwrap();
                    b.truncate(n as usize);
                    out.push(b);
                }
            }
            "*" => {
                for _ in 0..l[1..].parse::<i64>().unwrap() {
                    value(r, out);
                }
            }
            _ => panic!("unexpected redis answer {l}"),
        }
    }
    let mut ok = Vec::new();
    value(&mut reader, &mut ok);
    value(&mut reader, &mut values);
    let _ = s.shutdown(Shutdown::Both);
    values
}

/// A TCP proxy in front of a server: forwards, or hangs (accepts and never
/// answers, like a stopped server), or dies (every connection cut, the port
/// closed) when told or after forwarding some bytes.
struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: u16,
    hang: bool,
    dead: AtomicBool,
    die_after: u64,
    forwarded: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
}

impl ProxyState {
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Proxy {
    fn start(upstream: u16, hang: bool, die_after: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Proxy::serve(listener, upstream, hang, die_after)
    }

    /// A proxy that forwards from `port` (a server that starts there).
    fn start_at(port: u16, upstream: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        Proxy::serve(listener, upstream, false, 0)
    }

    fn serve(listener: TcpListener, upstream: u16, hang: bool, die_after: u64) -> Proxy {
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream,
            hang,
            dead: AtomicBool::new(false),
            die_after,
            forwarded: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&state);
        std::thread::spawn(move || loop {
            if s.dead.load(Ordering::SeqCst) {
                return; // the listener closes: the port is closed
            }
            let Ok((client, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            client.set_nonblocking(false).unwrap();
            s.conns.lock().unwrap().push(client.try_clone().unwrap());
            if s.hang {
                continue;
            }
            let server = TcpStream::connect(("127.0.0.1", s.upstream)).unwrap();
            s.conns.lock().unwrap().push(server.try_clone().unwrap());
            for (mut from, mut to, count) in [
                (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    false,
                ),
                (server, client, true),
            ] {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let mut n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Dying: answers are cut at exactly `die_after`
                        // bytes, however the server's bytes were chunked.
                        let mut dies = false;
                        if count && s.die_after > 0 {
                            let total = s.forwarded.fetch_add(n as u64, Ordering::SeqCst);
                            if total + n as u64 >= s.die_after {
                                n = s.die_after.saturating_sub(total) as usize;
                                dies = true;
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if dies {
                            s.kill();
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        Proxy { port, state }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.kill();
    }
}

/// `count` modules with distinct contents, and a script that imports them
/// all and checks what they compute.
fn modules(t: &TestDir, name: &str, count: usize) -> PathBuf {
    modules_salted(t, name, count, "")
}

/// [`modules`] whose sources differ from those of another salt.
fn modules_salted(t: &TestDir, name: &str, count: usize, salt: &str) -> PathBuf {
    let dir = t.join(name);
    for i in 0..count {
        t.write(
            format!("{name}/pkg/m{i}.py"),
            format!(
                "# {salt}\nVALUE = {i}\n\ndef f(x):\n    return x * {i} + {}\n",
                i * i
            ),
        );
    }
    t.write(format!("{name}/pkg/__init__.py"), format!("# {salt}\n"));
    let mut check = String::from("import sys\nsys.path.insert(0, sys.argv[1])\n");
    for i in 0..count {
        check.push_str(&format!(
            "import pkg.m{i}\nassert pkg.m{i}.VALUE == {i} and pkg.m{i}.f(2) == {}\n",
            2 * i + i * i
        ));
    }
    t.write(format!("{name}-check.py"), check);
    dir
}

/// Imports the modules of [`modules`] and asserts that each came from a
/// pyc and computed the right thing.
fn assert_modules_load(t: &TestDir, name: &str, count: usize) {
    let dir = t.join(name);
    let script = t.join(format!("{name}-check.py"));
    let log = python_v(
        &python("3.11"),
        &[script.to_str().unwrap(), dir.to_str().unwrap()],
        &[],
    );
    assert_nothing_compiled(&log, &dir, count + 1);
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

fn remote0(v: &Value) -> &Value {
    &v["remotes"][0]
}

fn warnings(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("warning"))
        .map(str::to_string)
        .collect()
}

fn assert_ok(out: &Output, v: &Value) {
    assert_output!(
        out,
        out.status.success() && n(v, "failed") == 0,
        "link failed: {v}"
    );
}

/// A store links a venv of real packages with the remote; another, empty
/// store (another machine) links a fresh copy with no compile at all, and
/// Python compiles nothing at import; a third link of the same store never
/// asks the remote again (what was fetched was kept locally).
fn shares_a_venv_between_machines(b: Backend) {
    let t = TestDir::new();
    let python = python("3.11");
    let (venv_a, venv_b, venv_c) = (t.join("venv-a"), t.join("venv-b"), t.join("venv-c"));
    make_venv(&python, &venv_a);
    let (out, a) = b.link(&t.join("store-a"), &venv_a, &[]);
    assert_ok(&out, &a);
    let pycs = n(&a, "pycs");
    assert!(pycs > 300, "{a}");
    assert_eq!(n(&a, "compiled"), pycs, "{a}");
    assert!(n(remote0(&a), "uploads") > 0, "{a}");
    assert_eq!(n(remote0(&a), "errors"), 0, "{a}");
    assert!(!b.stored().is_empty());

    make_venv(&python, &venv_b);
    let store_b = t.join("store-b");
    let (out, second) = b.link(&store_b, &venv_b, &[]);
    assert_ok(&out, &second);
    assert_eq!(n(&second, "compiled"), 0, "{second}");
    assert_eq!(n(&second, "fetched") + n(&second, "hits"), pycs, "{second}");
    assert!(n(&second, "fetched") > 0, "{second}");
    assert_eq!(n(remote0(&second), "rejected"), 0, "{second}");
    assert_eq!(n(remote0(&second), "uploads"), 0, "{second}");
    // A directory's pycs come in one request.
    assert!(
        n(remote0(&second), "requests") * 3 < n(&second, "fetched"),
        "{second}"
    );
    assert!(warnings(&out).is_empty(), "{:?}", warnings(&out));
    let imports = "import pip._internal.cli.main, pip._internal.commands.install, \
                   pip._vendor.rich.console, pip._vendor.requests";
    let log = python_v(&venv_b.join("bin/python"), &["-c", imports], &[]);
    assert_nothing_compiled(&log, &venv_b, 100);

    // Backfilled: the same machine links another copy without the remote's help.
    make_venv(&python, &venv_c);
    let (out, third) = b.link(&store_b, &venv_c, &[]);
    assert_ok(&out, &third);
    assert_eq!(n(&third, "hits"), pycs, "{third}");
    assert_eq!(n(remote0(&third), "requests"), 0, "{third}");

    // The store remembers what each remote did.
    let stats = run_ok(pycstore(&store_b).arg("stats").arg("--json"));
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    let label = stats["remotes"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    assert_eq!(
        n(&stats["remotes"][&label], "hits"),
        n(remote0(&second), "hits"),
        "{stats}"
    );
}

/// `--remote-read-only` fetches but never writes.
fn read_only_uploads_nothing(b: Backend) {
    let t = TestDir::new();
    let src = modules(&t, "a", 20);
    let (out, a) = b.link(&t.join("store-a"), &src, &["--remote-read-only"]);
    assert_ok(&out, &a);
    assert_eq!(n(&a, "compiled"), 21, "{a}");
    assert_eq!(n(remote0(&a), "uploads"), 0, "{a}");
    assert_eq!(n(remote0(&a), "bytes_out"), 0, "{a}");
    assert_eq!(b.stored(), Vec::<String>::new());
    // The environment variable says the same.
    let src = modules(&t, "b", 20);
    let mut cmd = b.cmd(&t.join("store-b"), "link");
    cmd.arg(&src)
        .arg("--python")
        .arg(python("3.11"))
        .env("PYCSTORE_REMOTE_READ_ONLY", "1");
    let (out, v) = link_json(&mut cmd);
    assert_ok(&out, &v);
    assert_eq!(n(remote0(&v), "uploads"), 0, "{v}");
    assert_eq!(b.stored(), Vec::<String>::new());
}

/// A remote whose objects and entries were tampered with gives no wrong
/// pyc: every tampered thing is rejected and compiled locally, with one
/// warning.
fn tampered_remote_gives_no_wrong_pyc(b: Backend) {
    let t = TestDir::new();
    let count = 40;
    let src = modules(&t, "a", count);
    let (out, a) = b.link(&t.join("store-a"), &src, &[]);
    assert_ok(&out, &a);
    let stored = b.stored();
    let entries: Vec<&String> = stored.iter().filter(|s| s.contains("/entries/")).collect();
    let objects: Vec<&String> = stored.iter().filter(|s| s.contains("/objects/")).collect();
    assert_eq!(entries.len(), count + 1, "{stored:#?}");
    // Flip a byte in the middle of every other object: stored apart, or
    // inside its entry (small objects travel in their entry, after the
    // 110 bytes of key, object id, size, header and inline length).
    for name in objects.iter() {
        let mut bytes = b.read(name);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        b.write(name, &bytes);
    }
    for name in entries.iter().skip(1).step_by(2) {
        let mut bytes = b.read(name);
        let inline = u32::from_le_bytes(bytes[106..110].try_into().unwrap()) as usize;
        if inline > 0 {
            bytes[110 + inline / 2] ^= 0x55;
            b.write(name, &bytes);
        }
    }
    // Flip a byte of the recorded header (the source hash) in some entries.
    for name in entries.iter().skip(2).step_by(6) {
        let mut bytes = b.read(name);
        bytes[18 + 32 + 32 + 8 + 12] ^= 0x01;
        b.write(name, &bytes);
    }
    // A self-consistent entry of another source under a key: its object
    // checks out against its name, not against the local source.
    let (donor, victim) = (entries[0], entries[2]);
    let mut forged = b.read(donor);
    let key_hex = victim.rsplit('/').next().unwrap();
    for i in 0..32 {
        forged[18 + i] = u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    b.write(victim, &forged);
    // Another entry stored under the wrong name.
    let moved = b.read(entries[3]);
    b.write(entries[4], &moved);
    // The directory's bundle carries the same tampered entries.
    rebundle(&b, &stored);

    let src_b = modules(&t, "b", count);
    let (out, second) = b.link(&t.join("store-b"), &src_b, &[]);
    assert_ok(&out, &second);
    let rejected = n(remote0(&second), "rejected");
    assert!(rejected >= (count / 2) as u64, "{second}");
    assert_eq!(
        n(&second, "compiled") + n(&second, "fetched"),
        count as u64 + 1,
        "{second}"
    );
    // Each tampered pyc is rejected at most twice (in the bundle, then by
    // its own name), and compiled.
    assert!(2 * n(&second, "compiled") >= rejected, "{second}");
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("rejected and compiled locally"), "{w:?}");
    assert_modules_load(&t, "b", count);
}

/// Rewrites every bundle the remote holds with the entries now stored
/// under the names of those it carries: what was done to the entries is
/// done to the bundles too.
fn rebundle(b: &Backend, stored: &[String]) {
    let bundles: Vec<&String> = stored.iter().filter(|s| s.contains("/bundles/")).collect();
    assert!(!bundles.is_empty(), "{stored:#?}");
    for name in bundles {
        let bundle = b.read(name);
        let mut out = bundle[..23].to_vec();
        let mut rest = &bundle[23..];
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            let key: String = rest[4 + 18..4 + 50]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let entry = stored
                .iter()
                .find(|s| s.contains("/entries/") && s.ends_with(&key))
                .unwrap();
            let entry = b.read(entry);
            out.extend_from_slice(&(entry.len() as u32).to_le_bytes());
            out.extend_from_slice(&entry);
            rest = &rest[4 + len..];
        }
        b.write(name, &out);
    }
}

/// A directory's pycs come in one bundle; a bundle that is damaged, or
/// that holds another directory's entries, costs the per-key requests it
/// saved, never a wrong pyc.
fn a_damaged_bundle_costs_requests_not_pycs(b: Backend) {
    let t = TestDir::new();
    let count = 30;
    let src = modules(&t, "a", count);
    let (out, a) = b.link(&t.join("store-a"), &src, &[]);
    assert_ok(&out, &a);
    let stored = b.stored();
    let bundles: Vec<&String> = stored.iter().filter(|s| s.contains("/bundles/")).collect();
    assert_eq!(bundles.len(), 1, "one directory, one bundle: {stored:#?}");
    let bundle = b.read(bundles[0]);

    // Intact: one request for the directory's 31 pycs.
    let (out, v) = b.link(&t.join("store-b"), &modules(&t, "b", count), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert_eq!(n(remote0(&v), "requests"), 1, "{v}");
    assert!(warnings(&out).is_empty(), "{:?}", warnings(&out));

    // Cut short: rejected once, every pyc then asked for by its own name,
    // and the bundle written again (one more request).
    b.write(bundles[0], &bundle[..bundle.len() - 7]);
    let (out, v) = b.link(&t.join("store-c"), &modules(&t, "c", count), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert_eq!(n(&v, "compiled"), 0, "{v}");
    assert_eq!(n(remote0(&v), "rejected"), 1, "{v}");
    assert_eq!(n(remote0(&v), "requests"), count as u64 + 3, "{v}");
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("not a pycstore-bundle-v1 record"), "{w:?}");
    assert_modules_load(&t, "c", count);
    let (out, v) = b.link(&t.join("store-e"), &modules(&t, "e", count), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert_eq!(n(remote0(&v), "requests"), 1, "written again: {v}");

    // Another directory's bundle under this one's name: it answers none of
    // the keys asked, and the reader asks for each.
    let other = modules_salted(&t, "x", 3, "other");
    let (out, v) = b.link(&t.join("store-x"), &other, &[]);
    assert_ok(&out, &v);
    let theirs = b
        .stored()
        .into_iter()
        .find(|s| s.contains("/bundles/") && s != bundles[0])
        .unwrap();
    b.write(bundles[0], &b.read(&theirs));
    let (out, v) = b.link(&t.join("store-d"), &modules(&t, "d", count), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert_eq!(n(remote0(&v), "rejected"), 0, "{v}");
    assert!(warnings(&out).is_empty(), "{:?}", warnings(&out));
    assert_modules_load(&t, "d", count);
}

/// A record longer than any valid one of its kind (what a hostile writer
/// stores to exhaust readers' memory) is read only up to that length,
/// rejected, and its pycs compiled: a 40 MiB bundle, a 20 MiB entry and a
/// 20 MiB object cost the reader little more than the 8 MiB a bundle may
/// hold.
fn an_oversized_record_is_cut_off(b: Backend) {
    let t = TestDir::new();
    let count = 30;
    let (out, a) = b.link(&t.join("store-a"), &modules(&t, "a", count), &[]);
    assert_ok(&out, &a);
    let stored = b.stored();
    let bundle = stored.iter().find(|s| s.contains("/bundles/")).unwrap();
    let entry = stored.iter().find(|s| s.contains("/entries/")).unwrap();
    let huge = |len: usize, head: &[u8]| {
        let mut v = head.to_vec();
        v.resize(len, 0x5a);
        v
    };
    b.write(bundle, &huge(40 << 20, &b.read(bundle)));
    b.write(entry, &huge(20 << 20, &b.read(entry)));
    // An entry whose object is stored apart, as a large pyc's is: it is
    // read no further than the entry's size allows.
    let other = stored.iter().rfind(|s| s.contains("/entries/")).unwrap();
    let mut apart = b.read(other)[..106].to_vec();
    apart.extend_from_slice(&[0, 0, 0, 0, 0]);
    b.write(other, &apart);
    let object: String = apart[50..82].iter().map(|b| format!("{b:02x}")).collect();
    let ns = other.split("/entries/").next().unwrap();
    b.write(
        &format!("{ns}/objects/{}/{object}", &object[..2]),
        &huge(20 << 20, &[0x28, 0xb5, 0x2f, 0xfd]),
    );

    let (out, v) = b.link(&t.join("store-b"), &modules(&t, "b", count), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 - 1, "{v}");
    assert_eq!(n(&v, "compiled"), 2, "{v}");
    assert_eq!(n(remote0(&v), "errors"), 0, "{v}");
    assert_eq!(n(remote0(&v), "rejected"), 3, "{v}");
    let bytes_in = n(remote0(&v), "bytes_in");
    assert!(bytes_in < 10 << 20, "read {bytes_in} bytes: {v}");
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("larger than any valid one"), "{w:?}");
    assert_modules_load(&t, "b", count);
}

/// An empty record, or something else than a record under a record's name
/// (a directory, a Redis list), gives no pyc and leaves the remote in use:
/// the rest of the run still fetches from it.
fn what_is_not_a_record_is_passed_over(b: Backend) {
    let t = TestDir::new();
    let count = 30;
    let (out, a) = b.link(
        &t.join("store-a"),
        &modules(&t, "a", count),
        &["--remote-read-only"],
    );
    assert_ok(&out, &a);
    assert!(b.stored().is_empty());
    // Entries only, no bundle: every pyc is asked for by its own name.
    let (out, a) = b.link(&t.join("store-b"), &modules(&t, "b", count), &[]);
    assert_ok(&out, &a);
    let stored = b.stored();
    for bundle in stored.iter().filter(|s| s.contains("/bundles/")) {
        b.write(bundle, b"");
    }
    let entries: Vec<&String> = stored.iter().filter(|s| s.contains("/entries/")).collect();
    b.write(entries[0], b"");
    let rejected = b.put_not_a_record(entries[1]);

    let (out, v) = b.link(
        &t.join("store-c"),
        &modules(&t, "c", count),
        &["--remote-read-only"],
    );
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 - 1, "{v}");
    assert_eq!(n(&v, "compiled"), 2, "{v}");
    assert_eq!(n(remote0(&v), "errors"), 0, "{v}");
    assert_eq!(n(remote0(&v), "rejected"), u64::from(rejected), "{v}");
    let w = warnings(&out);
    assert_eq!(w.len(), usize::from(rejected), "{w:?}");
    if rejected {
        assert!(w[0].contains("where an entry belongs"), "{w:?}");
    }
    assert_modules_load(&t, "c", count);
}

/// With trusted keys, only entries signed by one of them are taken:
/// unsigned ones and those signed by another key are compiled locally.
fn only_trusted_signatures_are_accepted(b: Backend) {
    let t = TestDir::new();
    for name in ["ours", "theirs"] {
        run_ok(
            pycstore(&t.store())
                .arg("keygen")
                .arg(name)
                .arg("--dir")
                .arg(t.path()),
        );
    }
    let ours = std::fs::read_to_string(t.join("ours.pub")).unwrap();
    let count = 10;
    // Unsigned uploads, and uploads signed by a key the readers do not trust.
    let src = modules(&t, "a", count);
    let (out, v) = b.link(&t.join("store-a"), &src, &[]);
    assert_ok(&out, &v);
    let src = modules(&t, "b", count);
    let mut cmd = b.cmd(&t.join("store-b"), "link");
    cmd.arg(&src)
        .arg("--python")
        .arg(python("3.11"))
        .env("PYCSTORE_REMOTE_SIGNING_KEY", t.join("theirs.secret"));
    let (out, v) = link_json(&mut cmd);
    assert_ok(&out, &v);
    assert!(
        n(remote0(&v), "hits") > 0,
        "the same sources were uploaded: {v}"
    );
    for (name, what) in [("c", "unsigned"), ("d", "signed by another key")] {
        let src = modules(&t, name, count);
        let (out, v) = b.link(
            &t.join(format!("store-{name}")),
            &src,
            &["--remote-trusted-keys", ours.trim(), "--remote-read-only"],
        );
        assert_ok(&out, &v);
        assert_eq!(n(&v, "fetched"), 0, "{what}: {v}");
        assert_eq!(n(&v, "compiled"), count as u64 + 1, "{what}: {v}");
        assert!(n(remote0(&v), "rejected") > 0, "{what}: {v}");
        assert_eq!(warnings(&out).len(), 1, "{:?}", warnings(&out));
        assert_modules_load(&t, name, count);
    }
    // A trusted writer's uploads are taken, by readers given the public key
    // in a file.
    let src = modules_salted(&t, "e", count + 5, "signed");
    let mut cmd = b.cmd(&t.join("store-e"), "link");
    cmd.arg(&src)
        .arg("--python")
        .arg(python("3.11"))
        .env("PYCSTORE_REMOTE_SIGNING_KEY", t.join("ours.secret"));
    let (out, v) = link_json(&mut cmd);
    assert_ok(&out, &v);
    let src = modules_salted(&t, "f", count + 5, "signed");
    let (out, v) = b.link(
        &t.join("store-f"),
        &src,
        &[
            "--remote-trusted-keys",
            t.join("ours.pub").to_str().unwrap(),
        ],
    );
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), 0, "{v}");
    assert_eq!(n(&v, "fetched"), count as u64 + 6, "{v}");
    assert_modules_load(&t, "f", count + 5);
}

/// A closed port, a server that accepts but never answers, a server that
/// dies mid-run and refused credentials: each gives a successful link,
/// compiled locally, with one warning naming the remote.
fn an_unusable_remote_never_fails_a_link(b: Backend) {
    let t = TestDir::new();
    let count = 60;
    // Warm the remote, so the mid-run death happens while fetching.
    let src = modules(&t, "warm", count);
    let (out, v) = b.link(&t.join("store-warm"), &src, &[]);
    assert_ok(&out, &v);

    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hanging = Proxy::start(b.port(), true, 0);
    // Cut well before the 60 answers end (about 20 KB from Redis, which
    // pipelines them on one connection; more over HTTP).
    let dying = Proxy::start(b.port(), false, 5_000);
    let cases: Vec<(&str, Backend, Vec<&str>)> = vec![
        ("a closed port", b.at_port(closed), vec![]),
        (
            "a server that never answers",
            b.at_port(hanging.port),
            vec!["--remote-timeout", "1"],
        ),
        ("a server killed mid-run", b.at_port(dying.port), vec![]),
        ("wrong credentials", b.with_wrong_credentials(), vec![]),
    ];
    for (i, (what, remote, extra)) in cases.into_iter().enumerate() {
        let name = format!("s{i}");
        let src = modules(&t, &name, count);
        let started = std::time::Instant::now();
        let (out, v) = remote.link(&t.join(format!("store-{i}")), &src, &extra);
        assert_ok(&out, &v);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: took {:?}",
            started.elapsed()
        );
        assert_eq!(
            n(&v, "compiled") + n(&v, "fetched"),
            count as u64 + 1,
            "{what}: {v}"
        );
        let w = warnings(&out);
        assert_eq!(w.len(), 1, "{what}: {w:?}");
        assert!(w[0].contains("cannot be used"), "{what}: {w:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for (_, secret) in &b.env {
            if secret.len() > 8 && !secret.starts_with("http") {
                assert!(
                    !stderr.contains(secret.as_str()),
                    "{what}: a secret in {stderr}"
                );
            }
        }
        if let Some((_, pass)) = b.url.split_once('@').and_then(|(h, _)| h.rsplit_once(':')) {
            assert!(!stderr.contains(pass), "{what}: the password in {stderr}");
            assert!(!String::from_utf8_lossy(&out.stdout).contains(pass));
        }
        assert_modules_load(&t, &name, count);
    }
    assert!(
        dying.state.dead.load(Ordering::SeqCst),
        "the proxy never died"
    );
}

/// The warnings a mount server logged.
fn mount_warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("WARN"))
        .map(str::to_string)
        .collect()
}

/// The per-interpreter counters of a store (`pycstore stats --json`), and
/// its one remote's.
fn store_stats(store: &Path) -> (Vec<Value>, Value) {
    let out = run_ok(pycstore(store).arg("stats").arg("--json"));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    let usage = stats["usage"]
        .as_object()
        .unwrap()
        .values()
        .cloned()
        .collect();
    let remotes = stats["remotes"].as_object().unwrap();
    assert_eq!(remotes.len(), 1, "{stats}");
    (usage, remotes.values().next().unwrap().clone())
}

/// The only interpreter's counts in a `status --json` report.
fn status_counts(v: &Value) -> &Value {
    let map = v["interpreters"].as_object().unwrap();
    assert_eq!(map.len(), 1, "{v}");
    map.values().next().unwrap()
}

/// A warm remote, an empty local store and a fresh copy of a venv,
/// read-only, with the overlay mounted over it: pip imports with nothing
/// compiled, every pyc it loads fetched from the remote on first access and
/// none compiled by the mount; the store records the remote's hits, and a
/// second mount without the remote serves the same from the store alone
/// (what was fetched was kept).
fn a_mount_fetches_from_a_warm_remote(b: Backend) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let python = python("3.11");
    let (venv_a, venv_b) = (t.join("venv-a"), t.join("venv-b"));
    make_venv(&python, &venv_a);
    let (out, a) = b.link(&t.join("store-a"), &venv_a, &[]);
    assert_ok(&out, &a);
    assert!(n(remote0(&a), "uploads") > 300, "{a}");

    make_venv(&python, &venv_b);
    let before = tree_hash(&venv_b);
    let ro = ReadOnly::new(&venv_b);
    let store_b = t.join("store-b");
    let over = [OsStr::new("--over"), venv_b.as_os_str()];
    let mut m = b.mount(&t, &store_b, &venv_b, &over);
    for _ in 0..2 {
        let log = python_v(&venv_python(&venv_b), &["-c", PIP_IMPORTS], &[]);
        assert_nothing_compiled(&log, &venv_b, 100);
    }
    let report = m.unmount();
    assert_eq!(reported(&report, "compiled on first access"), 0, "{report}");
    let fetched = reported(&report, "fetched from remotes");
    assert!(fetched >= 100, "{report}");
    assert!(mount_warnings(&report).is_empty(), "{report}");

    let (usage, remote) = store_stats(&store_b);
    assert_eq!(n(&remote, "hits"), fetched, "{remote}");
    assert_eq!(n(&remote, "rejected"), 0, "{remote}");
    assert_eq!(n(&remote, "errors"), 0, "{remote}");
    assert_eq!(n(&remote, "uploads"), 0, "{remote}");
    assert!(!usage.is_empty());
    for c in &usage {
        assert_eq!(n(c, "compiles"), 0, "{c}");
    }
    assert_eq!(usage.iter().map(|c| n(c, "misses")).sum::<u64>(), fetched);

    // Backfilled: without the remote, the store alone serves it all.
    let mut m = Mounted::start(&t, &store_b, &venv_b, &over);
    let log = python_v(&venv_python(&venv_b), &["-c", PIP_IMPORTS], &[]);
    assert_nothing_compiled(&log, &venv_b, 100);
    let report = m.unmount();
    assert_eq!(reported(&report, "compiled on first access"), 0, "{report}");
    assert!(
        reported(&report, "pycs served from the store") >= fetched,
        "{report}"
    );
    ro.release();
    assert_eq!(tree_hash(&venv_b), before, "the prefix changed");
}

/// The pycache-prefix view fetches from a warm remote too: modules import
/// from pycs under the prefix, every one of them fetched.
fn a_pycache_prefix_view_fetches_from_a_warm_remote(b: Backend) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let count = 20;
    let py = python("3.11");
    let src = modules(&t, "a", count);
    let (out, a) = b.link(&t.join("store-a"), &src, &[]);
    assert_ok(&out, &a);
    let src_b = modules(&t, "b", count);
    let prefix = t.join("pycache");
    std::fs::create_dir(&prefix).unwrap();
    let mut m = b.mount(
        &t,
        &t.join("store-b"),
        &prefix,
        &[
            OsStr::new("--pycache-prefix"),
            prefix.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    let script = t.join("b-check.py");
    let log = python_v(
        &py,
        &[script.to_str().unwrap(), src_b.to_str().unwrap()],
        &[("PYTHONPYCACHEPREFIX", prefix.as_os_str())],
    );
    assert_served_by_prefix(&log, &prefix, &src_b, count + 1);
    let report = m.unmount();
    // The modules' pycs all came from the remote (the stdlib's, which the
    // view serves too, were compiled and uploaded).
    assert_eq!(
        reported(&report, "fetched from remotes"),
        count as u64 + 1,
        "{report}"
    );
    assert!(pycs_under(&src_b).is_empty());
}

/// A remote whose every object was tampered with (bytes flipped in objects
/// stored apart and in those inside entries; another source's valid entry
/// moved under a key) gives the mount no wrong pyc: each is rejected and
/// compiled locally, with one warning, and the modules import from pycs
/// that compute what their sources say.
fn a_tampered_remote_gives_a_mount_no_wrong_pyc(b: Backend) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let count = 30;
    let src = modules(&t, "a", count);
    let (out, a) = b.link(&t.join("store-a"), &src, &[]);
    assert_ok(&out, &a);
    let stored = b.stored();
    let entries: Vec<&String> = stored.iter().filter(|s| s.contains("/entries/")).collect();
    let objects: Vec<&String> = stored.iter().filter(|s| s.contains("/objects/")).collect();
    assert_eq!(entries.len(), count + 1, "{stored:#?}");
    let donor = b.read(entries[0]);
    for name in &objects {
        let mut bytes = b.read(name);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        b.write(name, &bytes);
    }
    for name in entries.iter().skip(1) {
        let mut bytes = b.read(name);
        let inline = u32::from_le_bytes(bytes[106..110].try_into().unwrap()) as usize;
        if inline > 0 {
            bytes[110 + inline / 2] ^= 0x55;
            b.write(name, &bytes);
        }
    }
    // The first entry's key now names the second's: a self-consistent
    // entry whose pyc is of another source.
    let victim = entries[1];
    let mut forged = donor.clone();
    let key_hex = victim.rsplit('/').next().unwrap();
    for i in 0..32 {
        forged[18 + i] = u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    b.write(victim, &forged);
    // And the first entry's own pyc, its bytes flipped.
    let mut first = donor;
    let inline = u32::from_le_bytes(first[106..110].try_into().unwrap()) as usize;
    assert!(inline > 0, "small pycs travel inside their entry");
    first[110 + inline / 2] ^= 0x55;
    b.write(entries[0], &first);

    let src_b = modules(&t, "b", count);
    let py = python("3.11");
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut m = b.mount(
        &t,
        &t.join("store-b"),
        &mnt,
        &[
            OsStr::new("--source"),
            src_b.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ],
    );
    let script = t.join("b-check.py");
    let log = python_v(
        &python("3.11"),
        &[script.to_str().unwrap(), mnt.to_str().unwrap()],
        &[],
    );
    assert_nothing_compiled(&log, &mnt, count + 1);
    let report = m.unmount();
    assert_eq!(reported(&report, "fetched from remotes"), 0, "{report}");
    assert_eq!(
        reported(&report, "compiled on first access"),
        count as u64 + 1,
        "{report}"
    );
    let w = mount_warnings(&report);
    assert_eq!(w.len(), 1, "{report}");
    assert!(w[0].contains("rejected and compiled locally"), "{w:?}");
    let (_, remote) = store_stats(&t.join("store-b"));
    assert_eq!(n(&remote, "rejected"), count as u64 + 1, "{remote}");
    assert_eq!(n(&remote, "hits"), 0, "{remote}");
}

/// What a mount compiles goes to the remote, unless read-only, and `link`
/// on another machine takes it.
fn a_mount_uploads_what_it_compiles(b: Backend) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let count = 10;
    let py = python("3.11");
    let mut stores = 0;
    let mut mount_and_import = |name: &str, extra: &[&str]| {
        let src = modules(&t, name, count);
        let mnt = t.join(format!("mnt-{name}"));
        std::fs::create_dir(&mnt).unwrap();
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        stores += 1;
        let store = t.join(format!("store-{stores}"));
        let mut m = b.mount(&t, &store, &mnt, &args);
        let script = t.join(format!("{name}-check.py"));
        let log = python_v(&py, &[script.to_str().unwrap(), mnt.to_str().unwrap()], &[]);
        assert_nothing_compiled(&log, &mnt, count + 1);
        let report = m.unmount();
        assert_eq!(
            reported(&report, "compiled on first access"),
            count as u64 + 1,
            "{report}"
        );
        assert!(mount_warnings(&report).is_empty(), "{report}");
        store_stats(&store).1
    };
    let remote = mount_and_import("a", &["--remote-read-only"]);
    assert_eq!(n(&remote, "uploads"), 0, "{remote}");
    assert_eq!(b.stored(), Vec::<String>::new());
    let remote = mount_and_import("b", &[]);
    assert_eq!(n(&remote, "uploads"), count as u64 + 1, "{remote}");
    let entries = b
        .stored()
        .iter()
        .filter(|s| s.contains("/entries/"))
        .count();
    assert_eq!(entries, count + 1);
    let src = modules(&t, "c", count);
    let (out, v) = b.link(&t.join("store-c"), &src, &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), 0, "{v}");
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert_modules_load(&t, "c", count);
}

/// A remote that cannot be reached (a closed port, a server that accepts
/// and never answers) never fails a mount nor holds it up past the timeout:
/// one warning naming the remote, and every pyc compiled locally.
fn a_stopped_remote_never_fails_a_mount(b: Backend) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let count = 20;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hanging = Proxy::start(b.port(), true, 0);
    let py = python("3.11");
    let cases: Vec<(&str, Backend, Vec<&str>)> = vec![
        ("a closed port", b.at_port(closed), vec![]),
        (
            "a server that never answers",
            b.at_port(hanging.port),
            vec!["--remote-timeout", "1"],
        ),
    ];
    for (i, (what, remote, extra)) in cases.into_iter().enumerate() {
        let name = format!("s{i}");
        let src = modules(&t, &name, count);
        let mnt = t.join(format!("mnt-{i}"));
        std::fs::create_dir(&mnt).unwrap();
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let mut m = remote.mount(&t, &t.join(format!("store-{i}")), &mnt, &args);
        let started = std::time::Instant::now();
        let script = t.join(format!("{name}-check.py"));
        let log = python_v(
            &python("3.11"),
            &[script.to_str().unwrap(), mnt.to_str().unwrap()],
            &[],
        );
        assert_nothing_compiled(&log, &mnt, count + 1);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: took {:?}",
            started.elapsed()
        );
        let report = m.unmount();
        assert_eq!(
            reported(&report, "compiled on first access"),
            count as u64 + 1,
            "{what}: {report}"
        );
        let w = mount_warnings(&report);
        assert_eq!(w.len(), 1, "{what}: {report}");
        assert!(w[0].contains("cannot be used"), "{what}: {w:?}");
        for (_, secret) in &b.env {
            if secret.len() > 8 && !secret.starts_with("http") {
                assert!(
                    !report.contains(secret.as_str()),
                    "{what}: a secret in {report}"
                );
            }
        }
        if let Some((_, pass)) = b.url.split_once('@').and_then(|(h, _)| h.rsplit_once(':')) {
            assert!(!report.contains(pass), "{what}: the password in {report}");
        }
    }
}

/// Imports `pkg.m{i}` for each `i` of `which` from `dir` (a mount of
/// [`modules`]), asserting that each came from a pyc there.
fn import_some(dir: &Path, which: std::ops::Range<usize>) {
    let mut code = format!(
        "import sys\nsys.path.insert(0, {:?})\n",
        dir.to_str().unwrap()
    );
    for i in which.clone() {
        code.push_str(&format!("import pkg.m{i}\nassert pkg.m{i}.VALUE == {i}\n"));
    }
    let log = python_v(&python("3.11"), &["-c", &code], &[]);
    assert_nothing_compiled(&log, dir, which.len());
}

/// A remote that was down when the mount began is asked again once its
/// cooldown is over (`--remote-retry`): while it is down, pycs are compiled
/// locally, with one warning; once it is up (and warm), the first access
/// after the cooldown tries it again in the background, and the pycs of
/// the sources accessed after that are fetched from it, not compiled, with
/// nothing more said.
fn a_mount_retries_a_remote_that_failed(b: Backend) {
    if !fuse_available() {
        return;
    }
    let t = TestDir::new();
    let count = 10;
    let half = count / 2;
    let cooldown = 2;
    let py = python("3.11");
    // The server's port, closed for now: a stopped server.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let src = modules(&t, "b", count);
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let store = t.join("store-b");
    let cooldown_arg = cooldown.to_string();
    let mut m = b.at_port(port).mount(
        &t,
        &store,
        &mnt,
        &[
            OsStr::new("--source"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("--remote-retry"),
            OsStr::new(&cooldown_arg),
            OsStr::new("--remote-read-only"),
        ],
    );
    // Down: compiled locally (the package and the first half).
    import_some(&mnt, 0..half);

    // The server starts, warm: another machine linked the same sources.
    let warm = modules(&t, "w", count);
    let (out, v) = b.link(&t.join("store-w"), &warm, &[]);
    assert_ok(&out, &v);
    assert_eq!(n(remote0(&v), "uploads"), count as u64 + 1, "{v}");
    let _up = Proxy::start_at(port, b.port());
    std::thread::sleep(Duration::from_secs(cooldown + 1));
    // The first access after the cooldown starts the retry, in the
    // background: that module's pyc is compiled, or fetched when the retry
    // is done before Python reads the pyc (a race this test does not pin:
    // on a loaded machine it goes either way). Those after it fetch.
    import_some(&mnt, half..half + 1);
    std::thread::sleep(Duration::from_secs(2));
    import_some(&mnt, half + 1..count);

    let report = m.unmount();
    // The package and the first half while down, perhaps one more.
    let compiled = reported(&report, "compiled on first access");
    assert!(
        (half as u64 + 1..=half as u64 + 2).contains(&compiled),
        "{report}"
    );
    let fetched = reported(&report, "fetched from remotes");
    assert_eq!(compiled + fetched, count as u64 + 1, "{report}");
    let w = mount_warnings(&report);
    assert_eq!(w.len(), 1, "{report}");
    assert!(
        w[0].contains("cannot be used") && w[0].contains("trying it again every 2s"),
        "{w:?}"
    );
    let (_, remote) = store_stats(&store);
    assert_eq!(n(&remote, "hits"), fetched, "{remote}");
    assert!(n(&remote, "errors") >= 1, "{remote}");
    assert_eq!(n(&remote, "rejected"), 0, "{remote}");
}

/// `status --remote` counts the pycs the store lacks that a remote would
/// give, as `link` then finds them: all of a fresh copy's from a warm
/// remote; not a source the remote lacks, nor an entry whose header names
/// another source, nor unsigned entries when keys are trusted. It writes
/// nothing, and a remote it cannot reach gives one warning and no count.
fn status_counts_what_a_remote_would_give(b: Backend) {
    let t = TestDir::new();
    let count = 10;
    let src = modules(&t, "a", count);
    let (out, a) = b.link(&t.join("store-a"), &src, &[]);
    assert_ok(&out, &a);
    let src_b = modules(&t, "b", count);
    let store_b = t.join("store-b");

    let (v, w) = b.status(&store_b, &src_b, &[]);
    let c = status_counts(&v);
    assert_eq!(n(c, "missing"), count as u64 + 1, "{v}");
    assert_eq!(n(c, "from_remote"), count as u64 + 1, "{v}");
    assert!(w.is_empty(), "{w:?}");
    assert!(!store_b.exists(), "status made a store");
    assert!(pycs_under(&src_b).is_empty());
    // Without a remote there is nothing to count.
    let out = run_ok(
        pycstore(&store_b)
            .env_remove("PYCSTORE_REMOTE")
            .arg("status")
            .arg(&src_b)
            .arg("--python")
            .arg(python("3.11"))
            .arg("--json"),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(status_counts(&v), "from_remote"), 0, "{v}");

    // A source the remote lacks; an entry whose recorded header carries
    // another source hash.
    t.write("b/pkg/extra.py", "EXTRA = 1\n");
    let stored = b.stored();
    let entries: Vec<&String> = stored.iter().filter(|s| s.contains("/entries/")).collect();
    let mut bytes = b.read(entries[0]);
    bytes[18 + 32 + 32 + 8 + 12] ^= 0x01;
    b.write(entries[0], &bytes);
    let (v, w) = b.status(&store_b, &src_b, &[]);
    let c = status_counts(&v);
    assert_eq!(n(c, "missing"), count as u64 + 2, "{v}");
    assert_eq!(n(c, "from_remote"), count as u64, "{v}");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("not counted"), "{w:?}");
    // What status said is what link does.
    let (out, linked) = b.link(&store_b, &src_b, &["--remote-read-only"]);
    assert_ok(&out, &linked);
    assert_eq!(n(&linked, "fetched"), count as u64, "{linked}");
    assert_eq!(n(&linked, "compiled"), 2, "{linked}");

    // Trusted keys: the unsigned entries count for nothing.
    run_ok(
        pycstore(&t.store())
            .arg("keygen")
            .arg("k")
            .arg("--dir")
            .arg(t.path()),
    );
    let src_c = modules(&t, "c", count);
    let key = t.join("k.pub");
    let (v, w) = b.status(
        &t.join("store-c"),
        &src_c,
        &["--remote-trusted-keys", key.to_str().unwrap()],
    );
    assert_eq!(n(status_counts(&v), "from_remote"), 0, "{v}");
    assert_eq!(w.len(), 1, "{w:?}");

    // A remote that cannot be reached: one warning, nothing counted.
    if b.kind != Kind::File {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (v, w) = b.at_port(closed).status(&t.join("store-c"), &src_c, &[]);
        assert_eq!(n(status_counts(&v), "from_remote"), 0, "{v}");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("cannot be used"), "{w:?}");
    }
}

/// One test per scenario for a backend, each running the scenario of that
/// name against it; `network: true` adds those that stop or break a server.
macro_rules! backend_tests {
    (@each $kind:expr; $($name:ident),+ $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(b) = Backend::get($kind) {
                    super::$name(b);
                }
            }
        )+
    };
    ($kind:expr, network: true) => {
        backend_tests!($kind, network: false);
        backend_tests!(@each $kind;
            an_unusable_remote_never_fails_a_link,
            a_stopped_remote_never_fails_a_mount,
            a_mount_retries_a_remote_that_failed,
        );
    };
    ($kind:expr, network: false) => {
        backend_tests!(@each $kind;
            shares_a_venv_between_machines,
            read_only_uploads_nothing,
            tampered_remote_gives_no_wrong_pyc,
            a_damaged_bundle_costs_requests_not_pycs,
            an_oversized_record_is_cut_off,
            what_is_not_a_record_is_passed_over,
            only_trusted_signatures_are_accepted,
            a_mount_fetches_from_a_warm_remote,
            a_tampered_remote_gives_a_mount_no_wrong_pyc,
            a_pycache_prefix_view_fetches_from_a_warm_remote,
            a_mount_uploads_what_it_compiles,
            status_counts_what_a_remote_would_give,
        );
    };
}

mod file {
    use super::*;
    backend_tests!(Kind::File, network: false);
}
mod redis_server {
    use super::*;
    backend_tests!(Kind::Redis, network: true);
}
mod webdav {
    use super::*;
    backend_tests!(Kind::Webdav, network: true);
    backend_tests!(@each Kind::Webdav; a_busy_server_is_asked_again);
}
mod s3 {
    use super::*;
    backend_tests!(Kind::S3, network: true);
    backend_tests!(@each Kind::S3; a_busy_server_is_asked_again);
}

/// A file remote warmed by a link of `count` modules (`a`, into
/// `store-a`), with the test's directory and the remote's; `None` when
/// the backend cannot run here.
fn warm_file_remote(count: usize) -> Option<(Backend, TestDir, PathBuf)> {
    let b = Backend::get(Kind::File)?;
    let t = TestDir::new();
    let (out, a) = b.link(&t.join("store-a"), &modules(&t, "a", count), &[]);
    assert_ok(&out, &a);
    let root = b.disk.clone().unwrap();
    Some((b, t, root))
}

/// A file remote is read from regular files only: a FIFO (which would
/// block a reader for good) and a symlink (to a valid entry elsewhere)
/// under entries' names are rejected at once, and the link ends.
#[test]
fn a_file_remote_reads_regular_files_only() {
    let count = 10;
    let Some((b, t, root)) = warm_file_remote(count) else {
        return;
    };
    let stored = b.stored();
    for bundle in stored.iter().filter(|s| s.contains("/bundles/")) {
        std::fs::remove_file(root.join(bundle)).unwrap();
    }
    let entries: Vec<&String> = stored.iter().filter(|s| s.contains("/entries/")).collect();
    let fifo = root.join(entries[0]);
    std::fs::remove_file(&fifo).unwrap();
    run_ok(Command::new("mkfifo").arg(&fifo));
    let elsewhere = t.join("elsewhere");
    std::fs::rename(root.join(entries[1]), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join(entries[1])).unwrap();

    let mut cmd = b.cmd(&t.join("store-b"), "link");
    cmd.arg(modules(&t, "b", count))
        .args(["--python".as_ref(), python("3.11").as_os_str()])
        .args(["--remote-read-only", "--remote-timeout", "5", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("link still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 - 1, "{v}");
    assert_eq!(n(&v, "compiled"), 2, "{v}");
    assert_eq!(n(remote0(&v), "rejected"), 2, "{v}");
    assert_eq!(n(remote0(&v), "errors"), 0, "{v}");
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("where an entry belongs"), "{w:?}");
    assert_modules_load(&t, "b", count);
}

/// Whoever else can write a shared `file://` remote cannot make a reader
/// read, or a writer write, anywhere else through a symlink: a directory
/// of entries swapped for a symlink to a copy of itself elsewhere gives
/// nothing (every pyc is compiled), and nothing is written there.
#[test]
fn a_file_remote_is_never_read_or_written_through_a_symlink() {
    let count = 10;
    let Some((b, t, root)) = warm_file_remote(count) else {
        return;
    };
    let ns = root.join(format!("pycstore-v1/{}", b.namespace));
    std::fs::remove_dir_all(ns.join("bundles")).unwrap();
    let elsewhere = t.join("elsewhere");
    std::fs::rename(ns.join("entries"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, ns.join("entries")).unwrap();
    let files = || {
        walkdir::WalkDir::new(&elsewhere)
            .into_iter()
            .flatten()
            .count()
    };
    let before = files();

    let (out, v) = b.link(
        &t.join("store-b"),
        &modules(&t, "b", count),
        &["--remote-read-only"],
    );
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), 0, "{v}");
    assert_eq!(n(&v, "compiled"), count as u64 + 1, "{v}");
    assert!(n(remote0(&v), "rejected") > 0, "{v}");
    assert_modules_load(&t, "b", count);

    // New pycs, written: not into the directory the symlink names.
    let (out, v) = b.link(
        &t.join("store-c"),
        &modules_salted(&t, "c", count, "new"),
        &[],
    );
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), count as u64 + 1, "{v}");
    assert_eq!(files(), before, "written through the symlink");
    assert!(std::fs::symlink_metadata(ns.join("entries"))
        .unwrap()
        .is_symlink());
}

/// A front to the HTTP server at `upstream` that answers the first
/// request of every other connection with `503 Service Unavailable` (what
/// a busy S3 server says, "slow down") and closes it, and relays the
/// others. Returns its port and the count of requests refused.
fn busy_front(upstream: u16) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let refused = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&refused);
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(mut client) = client else { continue };
            if n % 2 == 0 {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    // The request head, then its body, before the answer.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let length: u64 = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let _ = std::io::copy(&mut (&client).take(length), &mut std::io::sink());
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = client.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    let _ = client.shutdown(Shutdown::Both);
                });
                continue;
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (port, refused)
}

/// A server that answers some requests "503, slow down" (as S3 does under
/// a burst of uploads) is asked again: every upload and fetch gets
/// through, with no warning, and the remote is not left alone.
fn a_busy_server_is_asked_again(b: Backend) {
    let t = TestDir::new();
    let count = 40;
    let (port, refused) = busy_front(b.port());
    let busy = b.at_port(port);
    let (out, v) = busy.link(&t.join("store-a"), &modules(&t, "a", count), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), count as u64 + 1, "{v}");
    assert_eq!(n(remote0(&v), "uploads"), count as u64 + 1, "{v}");
    assert_eq!(n(remote0(&v), "errors"), 0, "{v}");
    assert!(warnings(&out).is_empty(), "{:?}", warnings(&out));
    let (out, v) = busy.link(&t.join("store-b"), &modules(&t, "b", count), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert!(warnings(&out).is_empty(), "{:?}", warnings(&out));
    assert_modules_load(&t, "b", count);
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the front refused nothing"
    );
}

/// A link writing bundles to one remote never copies another remote's
/// entries into them: what a writer of B uploaded does not reach the
/// readers of A through a job that reads both.
#[test]
fn a_bundle_carries_no_other_remotes_entries() {
    let (Some(a), Some(b)) = (Backend::get(Kind::File), Backend::get(Kind::File)) else {
        return;
    };
    // Everything A holds, in any namespace.
    let held_by_a = || -> Vec<PathBuf> {
        walkdir::WalkDir::new(a.disk.clone().unwrap())
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect()
    };
    let t = TestDir::new();
    let count = 20;
    let (out, v) = b.link(&t.join("store-b"), &modules(&t, "b", count), &[]);
    assert_ok(&out, &v);
    // B holds entries and no bundle (as a remote warmed by an older `push`,
    // or whose bundles were lost, does).
    for name in b.stored().iter().filter(|s| s.contains("/bundles/")) {
        std::fs::remove_file(b.disk.clone().unwrap().join(name)).unwrap();
    }
    // A fresh store reading B (warm) and A (empty), both writable: it
    // writes the bundle it did not find, to B only.
    let (out, v) = b.link(
        &t.join("store-ab"),
        &modules(&t, "ab", count),
        &["--remote", &a.url],
    );
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert_eq!(n(&v, "compiled"), 0, "{v}");
    assert!(
        held_by_a().is_empty(),
        "B's entries reached A: {:#?}",
        held_by_a()
    );
    // What the job compiles itself goes to both, in bundles too.
    let (out, v) = b.link(
        &t.join("store-ab2"),
        &modules_salted(&t, "own", count, "own"),
        &["--remote", &a.url],
    );
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), count as u64 + 1, "{v}");
    let held = held_by_a();
    assert!(
        held.iter()
            .any(|p| p.to_string_lossy().contains("/bundles/")),
        "{held:#?}"
    );
}

/// Bad remote settings end the command before anything is written.
#[test]
fn bad_remote_settings_exit_2_and_write_nothing() {
    let t = TestDir::new();
    let src = modules(&t, "a", 2);
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--remote", "ftp://host/x"],
            vec![],
            "unknown scheme `ftp`",
        ),
        (vec!["--remote", "s3://"], vec![], "no bucket"),
        (
            vec!["--remote", "s3://bucket/p"],
            vec![],
            "AWS_ACCESS_KEY_ID",
        ),
        (
            vec!["--remote", "redis://h:1/zero"],
            vec![],
            "database number",
        ),
        (vec!["--remote", "not a url"], vec![], "--remote"),
        (
            vec![],
            vec![("PYCSTORE_REMOTE", "gopher://x")],
            "PYCSTORE_REMOTE",
        ),
        (
            vec!["--remote", "file:///nonexistent-pycstore-dir"],
            vec![],
            "not a directory",
        ),
        (
            vec![
                "--remote",
                "redis://u:hunter2secret@127.0.0.1:1/0",
                "--remote-trusted-keys",
                "x:y",
            ],
            vec![],
            "PYCSTORE_REMOTE_TRUSTED_KEYS",
        ),
        (
            vec![
                "--remote",
                "redis://127.0.0.1:1/0",
                "--remote-signing-key",
                "/nonexistent",
            ],
            vec![],
            "PYCSTORE_REMOTE_SIGNING_KEY",
        ),
    ];
    for (args, envs, expected) in cases {
        let mut cmd = t.pycstore();
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("PYCSTORE_REMOTE")
            .arg("link")
            .arg(&src)
            .arg("--python")
            .arg(python("3.11"))
            .args(&args)
            .envs(envs.iter().copied());
        let out = run(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_output!(
            out,
            out.status.code() == Some(2) && stderr.contains(expected),
            "{args:?}: expected exit 2 naming {expected:?}"
        );
        assert!(!stderr.contains("hunter2secret"), "{stderr}");
        assert!(!t.store().exists(), "{args:?} wrote the store");
        assert!(pycs_under(&src).is_empty(), "{args:?} placed pycs");
    }
    // A signing key given where its public key belongs (its file, or its
    // text) is refused without a word of it in the message.
    run_ok(
        pycstore(&t.join("keys-store"))
            .arg("keygen")
            .arg("ci")
            .arg("--dir")
            .arg(t.path()),
    );
    let secret = std::fs::read_to_string(t.join("ci.secret")).unwrap();
    let b64 = secret.trim().split_once(':').unwrap().1.to_string();
    for trusted in [t.join("ci.secret").display().to_string(), secret] {
        let mut cmd = t.pycstore();
        cmd.arg("link")
            .arg(&src)
            .arg("--python")
            .arg(python("3.11"))
            .args(["--remote", "redis://127.0.0.1:1/0"])
            .env("PYCSTORE_REMOTE_TRUSTED_KEYS", &trusted);
        let out = run(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_output!(
            out,
            out.status.code() == Some(2)
                && stderr.contains("a secret key")
                && stderr.contains("PYCSTORE_REMOTE_TRUSTED_KEYS"),
            "a secret key as trusted key: expected exit 2 saying so"
        );
        assert!(!stderr.contains(&b64[..12]), "{stderr}");
        assert!(!t.store().exists(), "wrote the store");
    }
}

/// `pycstore push` uploads what the store holds, so a later machine fetches
/// everything, each directory's pycs in one bundle, as from a remote a
/// link warmed; untrusted keys (an interpreter others can change) never go.
#[test]
fn push_prewarms_a_remote() {
    let Some(b) = Backend::get(Kind::File) else {
        return;
    };
    let t = TestDir::new();
    let count = 15;
    let src = modules(&t, "a", count);
    // Linked without a remote, then pushed.
    let (out, v) = link_json(
        t.pycstore()
            .arg("link")
            .arg(&src)
            .arg("--python")
            .arg(python("3.11")),
    );
    assert_ok(&out, &v);
    let out = run_ok(b.cmd(&t.store(), "push").arg(&src).arg("--json"));
    let pushed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&pushed, "uploaded"), count as u64 + 1, "{pushed}");
    assert_eq!(
        n(&pushed, "bundles"),
        1,
        "one directory, one bundle: {pushed}"
    );
    let stored = b.stored();
    assert_eq!(
        stored.iter().filter(|s| s.contains("/bundles/")).count(),
        1,
        "{stored:#?}"
    );
    let out = run_ok(b.cmd(&t.store(), "push").arg("--json"));
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&again, "uploaded"), 0, "{again}");
    assert_eq!(n(&again, "present"), count as u64 + 1, "{again}");
    assert_eq!(
        n(&again, "bundles"),
        0,
        "held whole, not written again: {again}"
    );

    // Another machine: the directory's 16 pycs in one request.
    let src_b = modules(&t, "b", count);
    let (out, v) = b.link(&t.join("store-b"), &src_b, &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), 0, "{v}");
    assert_eq!(n(&v, "fetched"), count as u64 + 1, "{v}");
    assert_eq!(n(remote0(&v), "requests"), 1, "{v}");
    assert_modules_load(&t, "b", count);

    // An entry whose object (carried inline) was damaged on the remote is
    // written again by the next push, not counted as there.
    let entry = stored.iter().find(|s| s.contains("/entries/")).unwrap();
    let good = b.read(entry);
    let mut damaged = good.clone();
    let inline = u32::from_le_bytes(damaged[106..110].try_into().unwrap()) as usize;
    assert!(inline > 0, "small objects travel in their entry");
    damaged[110 + inline / 2] ^= 0x55;
    b.write(entry, &damaged);
    let out = run_ok(b.cmd(&t.store(), "push").arg("--json"));
    let repaired: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&repaired, "uploaded"), 1, "{repaired}");
    assert_eq!(b.read(entry), good);

    // A bundle cut short on the remote is written again whole by the next
    // push, and read whole again.
    let bundle = stored.iter().find(|s| s.contains("/bundles/")).unwrap();
    let bytes = b.read(bundle);
    b.write(bundle, &bytes[..bytes.len() - 7]);
    let out = run_ok(b.cmd(&t.store(), "push").arg("--json"));
    let mended: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&mended, "bundles"), 1, "{mended}");
    assert_eq!(b.read(bundle), bytes);

    // Read-only remotes: push refuses, exit 2.
    let out = run(b.cmd(&t.store(), "push").arg("--remote-read-only"));
    assert_eq!(out.status.code(), Some(2));
}

/// A timestamp pyc's header names its source's mtime and size, not its
/// content: the owner of a linked tree who replaces a source by another of
/// the same size, mtime put back, must not get `push` to upload the old
/// source's bytecode under the new source's key (signed by the trusted
/// writer), for every machine with that source to run.
#[test]
fn push_never_pairs_a_pyc_with_a_source_it_was_not_compiled_from() {
    let Some(b) = Backend::get(Kind::File) else {
        return;
    };
    let t = TestDir::new();
    let planted = "def who():\n    return 'planted'\n";
    let genuine = "def who():\n    return 'genuine'\n";
    assert_eq!(planted.len(), genuine.len());
    let src = t.join("a");
    t.write("a/pkg/__init__.py", "");
    t.write("a/pkg/m.py", planted);
    let out = run(t
        .pycstore()
        .arg("link")
        .arg(&src)
        .arg("--python")
        .arg(python("3.11"))
        .args(["--invalidation-mode", "timestamp"]));
    assert!(out.status.success(), "{out:?}");
    // The source swapped for the genuine one, its mtime put back.
    let m = src.join("pkg/m.py");
    let mtime = std::fs::metadata(&m).unwrap().modified().unwrap();
    std::fs::write(&m, genuine).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&m)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let out = run_ok(b.cmd(&t.store(), "push").arg(&src).arg("--json"));
    let pushed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&pushed, "skipped"), 1, "{pushed}");

    // Another machine with the genuine source: it compiles it.
    t.write("b/pkg/__init__.py", "");
    t.write("b/pkg/m.py", genuine);
    let (out, v) = b.link(&t.join("store-b"), &t.join("b"), &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), 1, "{v}");
    let out = run_ok(
        Command::new(python("3.11"))
            .arg("-c")
            .arg("import sys; sys.path.insert(0, sys.argv[1]); import pkg.m; print(pkg.m.who())")
            .arg(t.join("b")),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "genuine");
}

/// The bundles `push` writes are the ones a link of the same tree asks
/// for, across nested directories and with a source that does not compile
/// (its keys name its bundle too): a read-only link from the pushed remote
/// asks for bundles, not for each pyc by its own name.
#[test]
fn pushed_bundles_are_the_ones_a_link_asks_for() {
    let Some(b) = Backend::get(Kind::File) else {
        return;
    };
    let t = TestDir::new();
    let tree = |root: &str| {
        for p in 0..12 {
            t.write(format!("{root}/p{p}/__init__.py"), format!("P = {p}\n"));
            for m in 0..3 {
                t.write(
                    format!("{root}/p{p}/m{m}.py"),
                    format!("def f():\n    return {p} * 10 + {m}\n"),
                );
            }
            t.write(format!("{root}/p{p}/sub/x.py"), format!("X = {p}\n"));
        }
        t.write(format!("{root}/p3/bad.py"), "def (:\n");
        t.join(root)
    };
    let python = python("3.11");
    let a = tree("a");
    let out = run(t
        .pycstore()
        .arg("link")
        .arg(&a)
        .arg("--python")
        .arg(&python));
    assert_eq!(
        out.status.code(),
        Some(1),
        "bad.py does not compile: {out:?}"
    );
    let out = run_ok(b.cmd(&t.store(), "push").arg(&a).arg("--json"));
    let pushed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let good = 12 * 5;
    assert_eq!(n(&pushed, "uploaded"), good, "{pushed}");
    let bundles = n(&pushed, "bundles");
    assert!(bundles >= 1, "{pushed}");

    let (out, v) = b.link(&t.join("store-b"), &tree("b"), &["--remote-read-only"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "bad.py does not compile: {out:?}"
    );
    assert_eq!(n(&v, "fetched"), good, "{v}");
    // One request per bundle, and at most a few for runs of a single pyc;
    // by name, the 60 pycs take 60.
    let requests = n(remote0(&v), "requests");
    assert!(
        requests <= bundles + 3,
        "{requests} requests, {bundles} bundles: {v}"
    );
}

/// An `https://` remote whose certificate comes from a CA the client trusts
/// through `SSL_CERT_FILE`, with HTTP basic auth (nginx's `auth_basic`,
/// scripts/test-servers): what one link uploads, a link into an empty
/// store fetches, all of it, with the user and password from
/// `PYCSTORE_REMOTE_HTTP_USER` and `PYCSTORE_REMOTE_HTTP_PASSWORD` or in
/// the URL. A wrong password, and a certificate from a CA the client does
/// not trust, each give one warning saying why, no password in any output,
/// and a link compiled locally.
#[test]
fn https_with_basic_auth() {
    let names = [
        "PYCSTORE_TEST_WEBDAV_TLS",
        "PYCSTORE_TEST_WEBDAV_TLS_CA",
        "PYCSTORE_TEST_WEBDAV_USER",
        "PYCSTORE_TEST_WEBDAV_PASSWORD",
        "PYCSTORE_TEST_WEBDAV_ROOT",
    ];
    let values: Vec<Option<String>> = names.iter().map(|n| var(n)).collect();
    if values.iter().any(Option::is_none) {
        skip_server("PYCSTORE_TEST_WEBDAV_TLS* and PYCSTORE_TEST_WEBDAV_USER/PASSWORD are not set");
        return;
    }
    let [url, ca, user, password, root] =
        <[String; 5]>::try_from(values.into_iter().map(Option::unwrap).collect::<Vec<_>>())
            .unwrap();
    let ns = namespace();
    let remote = |url: &str, env: &[(&str, &str)]| Backend {
        kind: Kind::Webdav,
        url: url.to_string(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        namespace: ns.clone(),
        disk: Some(PathBuf::from(&root)),
        _dir: None,
    };
    let b = remote(
        &url,
        &[
            ("SSL_CERT_FILE", &ca),
            ("PYCSTORE_REMOTE_HTTP_USER", &user),
            ("PYCSTORE_REMOTE_HTTP_PASSWORD", &password),
        ],
    );
    let t = TestDir::new();
    let count = 10;
    let all = count as u64 + 1;
    let assert_no_password = |out: &Output| {
        for stream in [&out.stdout, &out.stderr] {
            let text = String::from_utf8_lossy(stream);
            assert!(!text.contains(&password), "the password in {text}");
        }
    };

    let src = modules(&t, "a", count);
    let (out, v) = b.link(&t.join("store-a"), &src, &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "compiled"), all, "{v}");
    assert_eq!(n(remote0(&v), "uploads"), all, "{v}");
    assert_eq!(n(remote0(&v), "errors"), 0, "{v}");
    assert!(warnings(&out).is_empty(), "{out:?}");
    assert_no_password(&out);

    let src = modules(&t, "b", count);
    let (out, v) = b.link(&t.join("store-b"), &src, &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), all, "{v}");
    assert_eq!(n(&v, "compiled"), 0, "{v}");
    assert_modules_load(&t, "b", count);

    // The user and password in the URL instead.
    let in_url = url.replacen("https://", &format!("https://{user}:{password}@"), 1);
    let c = remote(&in_url, &[("SSL_CERT_FILE", &ca)]);
    let src = modules(&t, "c", count);
    let (out, v) = c.link(&t.join("store-c"), &src, &[]);
    assert_ok(&out, &v);
    assert_eq!(n(&v, "fetched"), all, "{v}");
    assert_eq!(
        v["remotes"][0]["remote"].as_str(),
        Some(url.as_str()),
        "{v}"
    );
    assert_no_password(&out);

    // A wrong password; a CA the client does not trust.
    let other_ca = t.join("other-ca.pem");
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .arg("ec_paramgen_curve:prime256v1")
            .args(["-nodes", "-days", "1", "-subj", "/CN=another CA", "-keyout"])
            .arg(t.join("other-ca.key"))
            .arg("-out")
            .arg(&other_ca),
    );
    let wrong = format!("{password}x");
    let other_ca = other_ca.to_str().unwrap().to_string();
    let cases = [
        (
            "a wrong password",
            remote(
                &url,
                &[
                    ("SSL_CERT_FILE", &ca),
                    ("PYCSTORE_REMOTE_HTTP_USER", &user),
                    ("PYCSTORE_REMOTE_HTTP_PASSWORD", &wrong),
                ],
            ),
            "credentials refused",
        ),
        (
            "a certificate from a CA not trusted",
            remote(
                &url,
                &[
                    ("SSL_CERT_FILE", &other_ca),
                    ("PYCSTORE_REMOTE_HTTP_USER", &user),
                    ("PYCSTORE_REMOTE_HTTP_PASSWORD", &password),
                ],
            ),
            "certificate",
        ),
    ];
    for (i, (what, r, why)) in cases.into_iter().enumerate() {
        let name = format!("d{i}");
        let src = modules(&t, &name, count);
        let (out, v) = r.link(&t.join(format!("store-{name}")), &src, &[]);
        assert_ok(&out, &v);
        assert_eq!(n(&v, "compiled"), all, "{what}: {v}");
        assert_eq!(n(&v, "fetched"), 0, "{what}: {v}");
        let w = warnings(&out);
        assert_eq!(w.len(), 1, "{what}: {w:?}");
        assert!(
            w[0].contains("cannot be used") && w[0].contains(why),
            "{what}: {w:?}"
        );
        assert_no_password(&out);
        assert_modules_load(&t, &name, count);
    }
}
