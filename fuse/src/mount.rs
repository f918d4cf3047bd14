//! Mounting a view, serving it until it is unmounted, and unmounting.
//!
//! The mount is read-only for the overlay, named `pycstore` (fsname and
//! subtype, as `/proc/self/mountinfo` shows it), checked by the kernel
//! against the attributes (`default_permissions`), and visible to the
//! mounting user only unless `allow_other` is asked for. Serving ends when
//! the mount goes away: `pycstore unmount`, `fusermount3 -u`, `umount`, or a
//! SIGTERM, SIGINT or SIGHUP to the server, which unmounts (lazily when the
//! mount is busy). If the server dies, the kernel fails every access to the
//! mount point with ENOTCONN ("Transport endpoint is not connected") until
//! it is unmounted: nothing hangs.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};
use pycstore_store::pyc::Flavor;
use pycstore_store::remote::Remotes;
use pycstore_store::{interpreter, Interpreter, Store};
use rustix::mount::UnmountFlags;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::fs::{Kind, PycFs};
use crate::pycs::{Pycs, PycsSettings, FLUSH_EVERY};
use crate::under::Under;
use crate::Error;

/// How long a compile still running when the view ends may take to finish
/// before its worker is left to end by itself.
const WORKERS_GRACE: Duration = Duration::from_secs(10);

/// Which view to mount.
#[derive(Clone, Debug)]
pub enum View {
    /// A read-only mirror of `source` with the store's pycs in its
    /// `__pycache__` directories. The mount point may be `source` itself.
    Overlay {
        /// The prefix to serve.
        source: PathBuf,
    },
    /// A tree for `PYTHONPYCACHEPREFIX`: `MOUNT/DIR/NAME.TAG.pyc` is the pyc
    /// of `/DIR/NAME.py`.
    PycachePrefix,
}

/// What to mount, and how.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The view.
    pub view: View,
    /// Where to mount it.
    pub mountpoint: PathBuf,
    /// Interpreters to serve pycs for; empty: the prefix's own (overlay) or
    /// `python3` on `PATH` (pycache prefix).
    pub python: Vec<PathBuf>,
    /// Optimize levels to serve.
    pub optimize: Vec<u8>,
    /// The invalidation mode of the pycs served.
    pub flavor: Flavor,
    /// Compile processes per interpreter.
    pub jobs: usize,
    /// Per-file compile timeout.
    pub timeout: Option<Duration>,
    /// Let other users see the mount (needs `user_allow_other` in
    /// `/etc/fuse.conf` for non-root users).
    pub allow_other: bool,
    /// Compile misses on first access; without it a miss has no pyc (and in
    /// the pycache-prefix view, Python's own compile is stored).
    pub compile: bool,
    /// Threads reading requests from the kernel.
    pub threads: usize,
    /// How long the kernel may cache what the view shows (names,
    /// attributes, listings): changes to the tree show within this time.
    pub cache_ttl: Duration,
    /// Remotes asked for misses on first access, before compiling, and
    /// given what the view compiles (unless read-only).
    pub remotes: Option<Arc<Remotes>>,
}

/// What a mount did, reported when it ends.
#[derive(Clone, Debug, Default)]
pub struct MountReport {
    /// pyc lookups served from objects the store had.
    pub hits: u64,
    /// Misses compiled on first access.
    pub compiled: u64,
    /// Misses filled from a remote on first access.
    pub fetched: u64,
    /// What each remote did while mounted (empty without remotes).
    pub remotes: Vec<pycstore_store::remote::RemoteReport>,
    /// Wall time those compiles took, in seconds.
    pub compile_seconds: f64,
    /// Sources that do not compile, or compiles that failed.
    pub failed: u64,
    /// pycs written by Python (pycache-prefix view) and stored.
    pub ingested: u64,
    /// pycs written by Python that did not pass the checks.
    pub refused: u64,
}

/// A mounted view, not yet serving.
pub struct Mount {
    session: Session<PycFs>,
    pycs: Arc<Pycs>,
    mountpoint: PathBuf,
    ended: mpsc::Receiver<Ended>,
    ended_tx: mpsc::Sender<Ended>,
}

/// How a session ended.
pub(crate) enum Ended {
    /// The filesystem was told the mount is gone.
    Destroyed,
    /// The session returned (an error before the filesystem was told).
    Returned(std::io::Result<()>),
}

/// Mounts a view of `store` (opened with [`Store::open_unlocked`]: a mount
/// takes the store lock only around its writes). The interpreters are
/// probed and the tree opened before mounting, so mounting over the prefix
/// itself works. Returns once the kernel has the mount; nothing is served
/// before [`Mount::run`].
pub fn mount(store: Store, options: &MountOptions) -> Result<Mount, Error> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| Error::Io { path, error }
    };
    let mountpoint =
        std::path::absolute(&options.mountpoint).map_err(io_err(&options.mountpoint))?;
    // With `--over`, the mount point is the prefix.
    let over = matches!(&options.view, View::Overlay { source } if *source == options.mountpoint);
    let (what, missing) = if over {
        ("the prefix", "does not exist")
    } else {
        (
            "the mount point",
            "does not exist: create it first (the mount point is an existing directory)",
        )
    };
    if let Some(problem) = not_a_directory(&mountpoint, missing) {
        return Err(Error::NotADirectory {
            what,
            path: mountpoint,
            problem,
        });
    }
    let (under, kind, default_python) = match &options.view {
        View::Overlay { source } => {
            let source = std::path::absolute(source).map_err(io_err(source))?;
            if let Some(problem) = not_a_directory(&source, "does not exist") {
                return Err(Error::NotADirectory {
                    what: "the prefix",
                    path: source,
                    problem,
                });
            }
            // A mount point inside the tree it shows would be in the view
            // too: a reader walking `MOUNT/MOUNT/MOUNT/...` would make each
            // request wait on the next one of the same server.
            if !over {
                if let (Ok(tree), Ok(point)) = (
                    std::fs::canonicalize(&source),
                    std::fs::canonicalize(&mountpoint),
                ) {
                    if point != tree && point.starts_with(&tree) {
                        return Err(Error::NotADirectory {
                            what: "the mount point",
                            path: mountpoint,
                            problem: "is inside the prefix the overlay shows, so the view would \
                                      contain itself: mount it outside the prefix, or over the \
                                      prefix itself with --over",
                        });
                    }
                }
            }
            let mut under = Under::open(&source).map_err(io_err(&source))?;
            if over {
                under = under.covered();
            }
            let python = if options.python.is_empty() {
                vec![interpreter::find_in_prefix(&source)?]
            } else {
                Vec::new()
            };
            (under, Kind::Overlay, python)
        }
        View::PycachePrefix => {
            let under =
                Under::open_following_dirs(Path::new("/")).map_err(io_err(Path::new("/")))?;
            let rel = mountpoint
                .strip_prefix("/")
                .unwrap_or(&mountpoint)
                .to_path_buf();
            let python = if options.python.is_empty() {
                vec![on_path("python3").ok_or_else(|| {
                    Error::NoPython("no `python3` on PATH; name one with --python".into())
                })?]
            } else {
                Vec::new()
            };
            (under, Kind::PycachePrefix { mountpoint: rel }, python)
        }
    };
    let python = if options.python.is_empty() {
        default_python
    } else {
        options.python.clone()
    };
    // An interpreter inside the tree a mount covers (`--over` an install)
    // runs its compile workers through the descriptor: a worker started
    // through the mount would keep it busy, so that it could not be
    // unmounted while the server runs.
    let workers: Vec<PathBuf> = python
        .iter()
        .map(|exe| match (&options.view, exe.strip_prefix(&mountpoint)) {
            (View::Overlay { .. }, Ok(rel)) if under_is(&options.view, &mountpoint) => {
                under.descriptor_path(rel)
            }
            _ => exe.clone(),
        })
        .collect();
    let pycs = Arc::new(Pycs::new(
        store,
        &PycsSettings {
            workers: &workers,
            python: &python,
            optimize: &options.optimize,
            flavor: options.flavor,
            jobs: options.jobs,
            timeout: options.timeout,
            compile: options.compile,
            remotes: options.remotes.clone(),
        },
    )?);
    raise_open_files_limit();

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("pycstore".into()),
        MountOption::Subtype("pycstore".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoAtime,
        match options.view {
            View::Overlay { .. } => MountOption::RO,
            View::PycachePrefix => MountOption::RW,
        },
    ];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let (ended_tx, ended) = mpsc::channel();
    let fs = PycFs::new(
        under,
        Arc::clone(&pycs),
        kind,
        options.cache_ttl,
        ended_tx.clone(),
    );
    let session = Session::new(fs, &mountpoint, &config).map_err(|source| Error::Mount {
        path: mountpoint.clone(),
        source,
    })?;
    Ok(Mount {
        session,
        pycs,
        mountpoint,
        ended,
        ended_tx,
    })
}

impl Mount {
    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The interpreters served.
    pub fn interpreters(&self) -> Vec<Interpreter> {
        self.pycs
            .interps
            .iter()
            .map(|i| i.interpreter.clone())
            .collect()
    }

    /// Serves until the mount goes away (unmounted by anyone, or by this
    /// process on SIGTERM, SIGINT or SIGHUP), recording what was compiled
    /// and used in the index every second and once more at the end. The
    /// session's thread stays parked afterwards (see `PycFs::destroy`): a
    /// server process ends after this.
    pub fn run(mut self) -> Result<MountReport, Error> {
        // fuser warns about every request a view leaves to the kernel's
        // defaults (they answer ENOSYS by design) and about unmounting a
        // mount that is already gone; only its errors are worth showing.
        log::set_max_level(log::LevelFilter::Error);
        let mut unmounter = self.session.unmount_callable();
        let mountpoint = self.mountpoint.clone();
        let mut signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|error| {
                Error::Io {
                    path: mountpoint.clone(),
                    error,
                }
            })?;
        let signal_handle = signals.handle();
        let on_signal = std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!("signal {signal}: unmounting `{}`", mountpoint.display());
                if let Err(e) = unmounter.unmount() {
                    tracing::debug!("unmount failed ({e}); detaching lazily");
                    lazy_unmount(&mountpoint);
                }
            }
        });

        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flusher = {
            let stop = Arc::clone(&stop);
            let pycs = Arc::clone(&self.pycs);
            std::thread::spawn(move || loop {
                let (lock, cv) = &*stop;
                let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (stopped, _) = cv
                    .wait_timeout(stopped, FLUSH_EVERY)
                    .unwrap_or_else(|e| e.into_inner());
                if *stopped {
                    return;
                }
                drop(stopped);
                pycs.flush();
            })
        };

        let pycs = Arc::clone(&self.pycs);
        let path = self.mountpoint.clone();
        // The session runs on a thread of its own, which never comes back
        // once the mount is gone (see `PycFs::destroy`): it ends with the
        // process.
        let session = self.session;
        let tell = self.ended_tx;
        std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || {
                let _ = tell.send(Ended::Returned(session.run()));
            })
            .map_err(|error| Error::Io {
                path: path.clone(),
                error,
            })?;
        let served = match self.ended.recv() {
            Ok(Ended::Returned(result)) => result,
            Ok(Ended::Destroyed) | Err(_) => Ok(()),
        };

        signal_handle.close();
        let _ = on_signal.join();
        *stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        stop.1.notify_all();
        let _ = flusher.join();
        pycs.stop_workers(WORKERS_GRACE);
        // Uploads still in flight get the request timeout to finish.
        if let Some(remotes) = pycs.remotes() {
            remotes.finish();
        }
        pycs.flush();
        served.map_err(|error| Error::Io { path, error })?;

        let s = &pycs.stats;
        let ops: Vec<String> = s.ops().map(|(name, n)| format!("{name} {n}")).collect();
        tracing::debug!("requests served: {}", ops.join(", "));
        Ok(MountReport {
            hits: s.hits.load(Ordering::Relaxed),
            compiled: s.compiled.load(Ordering::Relaxed),
            fetched: s.fetched.load(Ordering::Relaxed),
            remotes: pycs.remotes().map(Remotes::report).unwrap_or_default(),
            compile_seconds: s.compile_us.load(Ordering::Relaxed) as f64 / 1e6,
            failed: s.failed.load(Ordering::Relaxed),
            ingested: s.ingested.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
        })
    }
}

/// Unmounts a pycstore mount: `umount` as root, else `fusermount3 -u`; a
/// busy mount is refused unless `lazy`, which detaches it now and lets it go
/// when its last user leaves. Refuses anything that is not a pycstore
/// mount. The server process ends by itself once the mount is gone.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), Error> {
    let path = std::path::absolute(mountpoint).map_err(|error| Error::Io {
        path: mountpoint.to_path_buf(),
        error,
    })?;
    if !is_pycstore_mount(&path) {
        return Err(Error::NotMounted(path));
    }
    let root = rustix::process::geteuid().is_root();
    if root {
        let flags = if lazy {
            UnmountFlags::DETACH
        } else {
            UnmountFlags::empty()
        };
        return match umount2(&path, flags) {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::Unmount {
                path,
                message: if e.raw_os_error() == Some(libc::EBUSY) {
                    format!("{e}; a process is using it (retry with --lazy to detach it now)")
                } else {
                    e.to_string()
                },
            }),
        };
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let output = cmd
        .arg("--")
        .arg(&path)
        .output()
        .map_err(|e| Error::Unmount {
            path: path.clone(),
            message: format!("cannot run fusermount3 (apt-get install fuse3): {e}"),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Unmount {
            path,
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Whether the overlay's source is the mount point itself (`--over`).
fn under_is(view: &View, mountpoint: &Path) -> bool {
    match view {
        View::Overlay { source } => std::path::absolute(source).is_ok_and(|s| s == mountpoint),
        View::PycachePrefix => false,
    }
}

fn umount2(path: &Path, flags: UnmountFlags) -> std::io::Result<()> {
    Ok(rustix::mount::unmount(path, flags)?)
}

fn lazy_unmount(path: &Path) {
    if umount2(path, UnmountFlags::DETACH).is_err() {
        let _ = std::process::Command::new("fusermount3")
            .args(["-u", "-z", "--"])
            .arg(path)
            .output();
    }
}

/// Whether `/proc/self/mountinfo` lists a pycstore FUSE mount at `path`.
pub(crate) fn is_pycstore_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    let found = mount_lines(&info).any(|m| m.is_pycstore() && unescape_mountinfo(m.point) == want);
    found
}

/// One line of `/proc/self/mountinfo`, the fields the views use.
pub(crate) struct MountLine<'a> {
    /// The device's major and minor numbers.
    pub dev: (u32, u32),
    /// The mount point, escaped as mountinfo escapes it.
    pub point: &'a str,
    pub fstype: &'a str,
    pub source: &'a str,
    /// The superblock's options (`user_id=N` for FUSE).
    pub options: &'a str,
}

impl MountLine<'_> {
    /// Whether this is a pycstore view (named `pycstore`, fsname and
    /// subtype).
    pub fn is_pycstore(&self) -> bool {
        self.fstype.starts_with("fuse") && self.source == "pycstore"
    }
}

/// The lines of `info` (the text of `/proc/self/mountinfo`) that parse.
pub(crate) fn mount_lines(info: &str) -> impl Iterator<Item = MountLine<'_>> {
    info.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split(' ');
        let (major, minor) = left.nth(2)?.split_once(':')?;
        let point = left.nth(1)?;
        let mut right = right.split(' ');
        Some(MountLine {
            dev: (major.parse().ok()?, minor.parse().ok()?),
            point,
            fstype: right.next()?,
            source: right.next().unwrap_or(""),
            options: right.next().unwrap_or(""),
        })
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(n) = u8::from_str_radix(digits, 8) {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why `path` cannot be used as a directory, if it cannot: `missing`
/// when there is nothing there, or that it is something else.
fn not_a_directory(path: &Path, missing: &'static str) -> Option<&'static str> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => None,
        Ok(_) => Some("is not a directory"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(missing),
        // Anything else (a permission) is reported when it is opened.
        Err(_) => None,
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Served pycs keep their objects open (so `gc` cannot pull one from under
/// a reader): allow as many descriptors as the hard limit does.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    let below = match (limit.current, limit.maximum) {
        (Some(current), Some(maximum)) => current < maximum,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!("cannot raise the open files limit: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/tmp/tab\011x\\"), "/tmp/tab\tx\\\\");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
