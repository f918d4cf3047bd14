//! Whether an interpreter is safe to run. Running a Python executable runs
//! whatever its files say: the executable and every symlink leading to it,
//! the `pyvenv.cfg` beside it (whose `home` picks the standard library), and
//! the standard library it imports at startup. If a user other than the
//! caller or root can change any of these, running it (as root, or for a
//! store other users' environments read) lets that user run code as the
//! caller and put bytecode of their choosing under keys that every other
//! interpreter with the same magic number would be served.
//!
//! So every path step is checked before an interpreter runs: each entry must
//! belong to root or the caller, and no directory on the way may let anyone
//! else replace it (group- or world-writable without the sticky bit
//! protecting the entry). The rule holds by construction against races:
//! only root or the caller could change what was checked. What the probe
//! reports it loaded is checked the same way before any compile worker
//! starts. An interpreter that fails the check is refused where it matters
//! (the caller is root, or the store is shared) unless the caller overrides
//! with `--trust-python`; either way, what it compiles is keyed apart (see
//! `Verdict::key_domain`) and never serves another interpreter.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The command-line flag that runs an interpreter other users can change.
pub(crate) const OVERRIDE_FLAG: &str = "--trust-python";
/// The environment variable of `--trust-python`.
pub const OVERRIDE_ENV: &str = "PYCSTORE_TRUST_PYTHON";

static OVERRIDE: AtomicBool = AtomicBool::new(false);

/// Lets this process run interpreters that fail the check (the binary sets
/// it from `--trust-python` before any work). What they compile is still
/// kept apart.
pub fn set_override(on: bool) {
    OVERRIDE.store(on, Ordering::Relaxed);
}

/// Whether [`set_override`] was given `true`.
pub fn overridden() -> bool {
    OVERRIDE.load(Ordering::Relaxed)
}

/// The most symlinks followed while resolving one path (Linux's limit).
pub const MAX_SYMLINKS: u32 = 40;

/// A path step that someone other than root or the caller can change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Doubt {
    /// The file or directory in question.
    pub path: PathBuf,
    /// Why, in words: "belongs to user id 1001", "is writable by every user".
    pub reason: String,
}

impl std::fmt::Display for Doubt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` {}", self.path.display(), self.reason)
    }
}

/// Why someone other than root and this process's user could change what
/// `path` names (the file, a symlink or a directory on the way, resolved
/// from `/` as for an interpreter), or `None` when nobody else can: then
/// its bytes are the ones root or this user left there, whatever anyone
/// else does meanwhile.
pub fn others_can_change(path: &Path) -> Option<String> {
    Checker::new()
        .path(path)
        .err()
        .map(|doubt| doubt.to_string())
}

/// The result of checking an interpreter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Only root and the caller can change what it runs.
    Trusted,
    /// Someone else can: the first step found.
    Untrusted(Doubt),
}

impl Verdict {
    /// The domain its compile keys live in: `None` for a trusted
    /// interpreter; for any other, a value that only this executable (at
    /// this path, this file) has, so that nothing it compiles is ever looked
    /// up by another interpreter.
    pub fn key_domain(
        &self,
        executable: &Path,
        identity: (u64, u64, u64, i64),
    ) -> Option<[u8; 32]> {
        match self {
            Verdict::Trusted => None,
            Verdict::Untrusted(_) => {
                let mut hasher = blake3::Hasher::new();
                hasher.update(b"pycstore untrusted interpreter v1\0");
                let absolute =
                    std::path::absolute(executable).unwrap_or_else(|_| executable.to_path_buf());
                hasher.update(absolute.as_os_str().as_encoded_bytes());
                hasher.update(b"\0");
                hasher.update(&identity.0.to_le_bytes());
                hasher.update(&identity.1.to_le_bytes());
                hasher.update(&identity.2.to_le_bytes());
                hasher.update(&identity.3.to_le_bytes());
                Some(*hasher.finalize().as_bytes())
            }
        }
    }
}

/// Checks paths on behalf of one caller: root and the caller's effective
/// user are trusted, nobody else.
pub(crate) struct Checker {
    caller: u32,
    /// Directories already found safe, resolved.
    safe_dirs: HashSet<PathBuf>,
    /// What each path step looked like, and where each symlink led, when
    /// first examined: an interpreter's files share most of their steps,
    /// and one check looks at each step once.
    lstats: HashMap<PathBuf, std::fs::Metadata>,
    links: HashMap<PathBuf, PathBuf>,
    /// Paths already resolved through trusted steps.
    resolved: HashMap<PathBuf, PathBuf>,
}

impl Default for Checker {
    fn default() -> Self {
        Self::new()
    }
}

impl Checker {
    /// A checker for the calling process.
    pub fn new() -> Checker {
        Checker {
            caller: rustix::process::geteuid().as_raw(),
            safe_dirs: HashSet::new(),
            lstats: HashMap::new(),
            links: HashMap::new(),
            resolved: HashMap::new(),
        }
    }

    /// `lstat` of `path`, once per check.
    fn lstat(&mut self, path: &Path) -> std::io::Result<std::fs::Metadata> {
        if let Some(meta) = self.lstats.get(path) {
            return Ok(meta.clone());
        }
        let meta = std::fs::symlink_metadata(path)?;
        self.lstats.insert(path.to_path_buf(), meta.clone());
        Ok(meta)
    }

    /// `readlink` of `path`, once per check.
    fn read_link(&mut self, path: &Path) -> std::io::Result<PathBuf> {
        if let Some(target) = self.links.get(path) {
            return Ok(target.clone());
        }
        let target = std::fs::read_link(path)?;
        self.links.insert(path.to_path_buf(), target.clone());
        Ok(target)
    }

    fn trusted(&self, uid: u32) -> bool {
        uid == 0 || uid == self.caller
    }

    /// Everything that decides what running `executable` does before it
    /// reads a line of Python: the executable's path and symlinks, the
    /// `pyvenv.cfg` it would read and the directories that could hold one,
    /// and the library directories it could take its standard library from.
    pub fn interpreter(&mut self, executable: &Path) -> Verdict {
        self.check_interpreter(executable)
            .map_or_else(Verdict::Untrusted, |()| Verdict::Trusted)
    }

    /// The files a probe reported the interpreter loaded (its standard
    /// library modules and their cached pycs): each file, the directory
    /// holding it and that directory's `__pycache__`.
    pub fn loaded(&mut self, files: &[PathBuf]) -> Verdict {
        self.check_loaded(files)
            .map_or_else(Verdict::Untrusted, |()| Verdict::Trusted)
    }

    fn check_interpreter(&mut self, executable: &Path) -> Result<(), Doubt> {
        let absolute = std::path::absolute(executable).map_err(|e| unexaminable(executable, &e))?;
        let resolved = self.path(&absolute)?;
        // A venv is recognized by a pyvenv.cfg beside the executable as
        // invoked, or one level up; its `home` says where the standard
        // library is. Absent, nobody else may be able to create one.
        let mut starts = Vec::new();
        if let Some(bin) = absolute.parent() {
            for dir in [Some(bin), bin.parent()].into_iter().flatten() {
                self.closed_dir(dir)?;
                let cfg = dir.join("pyvenv.cfg");
                if std::fs::symlink_metadata(&cfg).is_ok() {
                    self.path(&cfg)?;
                    if let Some(home) = venv_home(&cfg) {
                        starts.push(home);
                    }
                    break;
                }
            }
        }
        if let Some(dir) = resolved.parent() {
            starts.push(dir.to_path_buf());
        }
        // CPython and PyPy look for their library upward from the start
        // directory: check each `lib/python*`, `lib/pypy*` and PyPy's
        // `lib-python`, `lib_pypy` that one of them could pick.
        let mut seen = HashSet::new();
        for start in starts {
            if std::fs::metadata(&start).is_err() {
                continue;
            }
            let start = self.path(&start)?;
            for ancestor in start.ancestors() {
                if !seen.insert(ancestor.to_path_buf()) {
                    continue;
                }
                for name in ["lib-python", "lib_pypy"] {
                    let dir = ancestor.join(name);
                    if std::fs::symlink_metadata(&dir).is_ok() {
                        self.closed_dir(&dir)?;
                    }
                }
                let lib = ancestor.join("lib");
                if !std::fs::metadata(&lib).is_ok_and(|m| m.is_dir()) {
                    continue;
                }
                let lib = self.path(&lib)?;
                if !seen.insert(lib.clone()) {
                    continue;
                }
                let entries = std::fs::read_dir(&lib).map_err(|e| unexaminable(&lib, &e))?;
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if ["python", "pypy", "libpython", "libpypy"]
                        .iter()
                        .any(|p| name.starts_with(p))
                    {
                        let path = entry.path();
                        if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                            self.closed_dir(&path)?;
                        } else if std::fs::metadata(&path).is_ok() {
                            self.path(&path)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn check_loaded(&mut self, files: &[PathBuf]) -> Result<(), Doubt> {
        for file in files {
            if self.lstat(file).is_err() {
                continue;
            }
            let resolved = self.path(file)?;
            for dir in [file.parent(), resolved.parent()].into_iter().flatten() {
                self.closed_dir(dir)?;
                let cache = dir.join("__pycache__");
                if dir.file_name() != Some("__pycache__".as_ref()) && self.lstat(&cache).is_ok() {
                    self.closed_dir(&cache)?;
                }
            }
        }
        Ok(())
    }

    /// `dir` resolves through trusted steps to a directory nobody else can
    /// add entries to (the sticky bit does not stop additions).
    fn closed_dir(&mut self, dir: &Path) -> Result<(), Doubt> {
        let resolved = self.path(dir)?;
        // A resolved path has no symlink in it: its lstat is its stat.
        let meta = self
            .lstat(&resolved)
            .map_err(|e| unexaminable(&resolved, &e))?;
        if meta.is_dir() {
            if let Some(reason) = writable_by_others(meta.mode()) {
                return Err(Doubt {
                    path: resolved,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Resolves `path` from `/`, component by component, following
    /// symlinks; every step must belong to root or the caller, and every
    /// directory looked into must keep others from replacing the entry.
    /// Returns the resolved path.
    fn path(&mut self, path: &Path) -> Result<PathBuf, Doubt> {
        let absolute = std::path::absolute(path).map_err(|e| unexaminable(path, &e))?;
        if let Some(resolved) = self.resolved.get(&absolute) {
            return Ok(resolved.clone());
        }
        let resolved = self.resolve(&absolute)?;
        self.resolved.insert(absolute, resolved.clone());
        Ok(resolved)
    }

    fn resolve(&mut self, absolute: &Path) -> Result<PathBuf, Doubt> {
        let mut pending: Vec<OsString> = components(absolute);
        pending.reverse();
        let mut current = PathBuf::from("/");
        let mut current_mode = self.directory(&current)?;
        let mut hops = 0;
        while let Some(name) = pending.pop() {
            if name == ".." {
                current.pop();
                current_mode = self.directory(&current)?;
                continue;
            }
            let entry = current.join(&name);
            let meta = self.lstat(&entry).map_err(|e| unexaminable(&entry, &e))?;
            if let Some(reason) = writable_by_others(current_mode) {
                let sticky = current_mode & 0o1000 != 0;
                if !(sticky && self.trusted(meta.uid())) {
                    return Err(Doubt {
                        path: current,
                        reason: format!("{reason}, so others can replace `{}`", entry.display()),
                    });
                }
            }
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(Doubt {
                        path: entry,
                        reason: "leads through too many symlinks".into(),
                    });
                }
                let target = self
                    .read_link(&entry)
                    .map_err(|e| unexaminable(&entry, &e))?;
                if target.is_absolute() {
                    current = PathBuf::from("/");
                    current_mode = self.directory(&current)?;
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
                continue;
            }
            if !self.trusted(meta.uid()) {
                return Err(Doubt {
                    path: entry,
                    reason: format!("belongs to user id {}", meta.uid()),
                });
            }
            if meta.is_dir() {
                current = entry;
                current_mode = meta.mode();
                continue;
            }
            if !pending.is_empty() {
                return Err(Doubt {
                    path: entry,
                    reason: "is not a directory".into(),
                });
            }
            if let Some(reason) = writable_by_others(meta.mode()) {
                return Err(Doubt {
                    path: entry,
                    reason,
                });
            }
            return Ok(entry);
        }
        Ok(current)
    }

    /// The mode of a directory already resolved from trusted steps, checking
    /// its owner.
    fn directory(&mut self, dir: &Path) -> Result<u32, Doubt> {
        let meta = self.lstat(dir).map_err(|e| unexaminable(dir, &e))?;
        if !self.safe_dirs.contains(dir) {
            if !self.trusted(meta.uid()) {
                return Err(Doubt {
                    path: dir.to_path_buf(),
                    reason: format!("belongs to user id {}", meta.uid()),
                });
            }
            self.safe_dirs.insert(dir.to_path_buf());
        }
        Ok(meta.mode())
    }
}

/// The components of an absolute or relative path to resolve one at a
/// time: names and `..`; `/` and `.` dropped.
pub fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

fn writable_by_others(mode: u32) -> Option<String> {
    if mode & 0o002 != 0 {
        Some("is writable by every user".into())
    } else if mode & 0o020 != 0 {
        Some("is writable by its group".into())
    } else {
        None
    }
}

fn unexaminable(path: &Path, err: &std::io::Error) -> Doubt {
    Doubt {
        path: path.to_path_buf(),
        reason: format!("could not be examined ({err})"),
    }
}

/// The `home` a `pyvenv.cfg` names (the directory of the base interpreter).
fn venv_home(cfg: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(cfg).ok()?;
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "home").then(|| PathBuf::from(value.trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    const NOBODY: u32 = 65534;

    fn dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("pycstore-trust-")
            .tempdir()
            .unwrap()
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn exe(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        chmod(path, 0o755);
    }

    #[test]
    fn root_owned_chain_is_trusted() {
        let t = dir();
        let python = t.path().join("base/bin/python3.11");
        exe(&python);
        symlink(&python, t.path().join("base/bin/python3")).unwrap();
        let mut checker = Checker::new();
        assert_eq!(
            checker.interpreter(&t.path().join("base/bin/python3")),
            Verdict::Trusted
        );
    }

    #[test]
    fn every_step_is_checked() {
        // The executable, a symlink's directory, a directory on the way,
        // group and world write, and a pyvenv.cfg.
        let t = dir();
        let base = t.path().join("base/bin/python3.11");
        exe(&base);
        let venv = t.path().join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        symlink(&base, venv.join("bin/python3")).unwrap();
        std::fs::write(venv.join("pyvenv.cfg"), "home = /nowhere\n").unwrap();
        let mut checker = Checker::new();
        let venv_python = venv.join("bin/python3");
        assert_eq!(checker.interpreter(&venv_python), Verdict::Trusted);

        let doubt = |p: &Path| match Checker::new().interpreter(p) {
            Verdict::Untrusted(d) => d,
            Verdict::Trusted => panic!("{} should not be trusted", p.display()),
        };

        chown(&venv.join("pyvenv.cfg"), NOBODY);
        assert_eq!(doubt(&venv_python).path, venv.join("pyvenv.cfg"));
        chown(&venv.join("pyvenv.cfg"), 0);

        chown(&venv.join("bin"), NOBODY);
        let d = doubt(&venv_python);
        assert_eq!(d.path, venv.join("bin"));
        assert!(d.reason.contains("65534"), "{d:?}");
        chown(&venv.join("bin"), 0);

        chmod(&venv.join("bin"), 0o775);
        assert!(doubt(&venv_python).reason.contains("group"));
        chmod(&venv.join("bin"), 0o1777);
        // Sticky protects the existing link, but a pyvenv.cfg could be added.
        assert_eq!(doubt(&venv_python).path, venv.join("bin"));
        chmod(&venv.join("bin"), 0o755);

        chmod(&base, 0o757);
        let d = doubt(&venv_python);
        assert_eq!(
            (d.path, d.reason.contains("every user")),
            (base.clone(), true)
        );
        chmod(&base, 0o755);

        chown(&t.path().join("base"), NOBODY);
        assert_eq!(doubt(&venv_python).path, t.path().join("base"));
        chown(&t.path().join("base"), 0);

        assert_eq!(Checker::new().interpreter(&venv_python), Verdict::Trusted);
    }

    #[test]
    fn a_sticky_directory_protects_entries_of_trusted_owners() {
        let t = dir();
        let shared = t.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let python = t.path().join("base/bin/python3");
        exe(&python);
        symlink(&python, shared.join("python3")).unwrap();
        chmod(&shared, 0o1777);
        let mut checker = Checker::new();
        assert!(checker.path(&shared.join("python3")).is_ok());
        chown(&shared.join("python3"), NOBODY);
        assert!(Checker::new().path(&shared.join("python3")).is_err());
    }

    #[test]
    fn a_standard_library_others_can_write_is_refused() {
        let t = dir();
        let python = t.path().join("base/bin/python3.11");
        exe(&python);
        let stdlib = t.path().join("base/lib/python3.11");
        std::fs::create_dir_all(stdlib.join("encodings")).unwrap();
        std::fs::write(stdlib.join("os.py"), "").unwrap();
        assert_eq!(Checker::new().interpreter(&python), Verdict::Trusted);
        chmod(&stdlib, 0o777);
        assert!(matches!(
            Checker::new().interpreter(&python),
            Verdict::Untrusted(d) if d.path == stdlib
        ));
        chmod(&stdlib, 0o755);

        let loaded = [stdlib.join("os.py"), stdlib.join("encodings/__init__.py")];
        assert_eq!(Checker::new().loaded(&loaded), Verdict::Trusted);
        chown(&stdlib.join("os.py"), NOBODY);
        assert!(matches!(
            Checker::new().loaded(&loaded),
            Verdict::Untrusted(d) if d.path == stdlib.join("os.py")
        ));
        chown(&stdlib.join("os.py"), 0);
        std::fs::create_dir(stdlib.join("__pycache__")).unwrap();
        chmod(&stdlib.join("__pycache__"), 0o777);
        assert!(matches!(
            Checker::new().loaded(&loaded),
            Verdict::Untrusted(d) if d.path == stdlib.join("__pycache__")
        ));
    }

    #[test]
    fn key_domains_differ_by_interpreter_and_trusted_has_none() {
        let doubt = Verdict::Untrusted(Doubt {
            path: "/x".into(),
            reason: String::new(),
        });
        let a = doubt.key_domain(Path::new("/a/bin/python3"), (1, 2, 3, 4));
        let b = doubt.key_domain(Path::new("/b/bin/python3"), (1, 2, 3, 4));
        let c = doubt.key_domain(Path::new("/a/bin/python3"), (1, 5, 3, 4));
        assert!(a.is_some() && a != b && a != c);
        assert_eq!(
            Verdict::Trusted.key_domain(Path::new("/a"), (1, 2, 3, 4)),
            None
        );
    }
}
