//! Small helpers shared by the store, its binary and its FUSE views, so that
//! each exists once: hex digits, the wall clock, a mutex that outlives a
//! panicking holder, and an I/O error that names the path it is about.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// `bytes` as lowercase hex digits, two per byte.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut digits = String::with_capacity(2 * bytes.len());
    for b in bytes {
        // Writing to a `String` cannot fail.
        let _ = write!(digits, "{b:02x}");
    }
    digits
}

/// `dir` joined with `names` in one allocation, as `dir.join(a).join(b)`
/// would make it for names that are single components (no `/`, not
/// absolute): a name is added after a `/` unless `dir` is empty or already
/// ends with one. On the paths of every source and object, where
/// `Path::join`'s copy and growth were a few percent of a link's
/// instructions.
pub fn joined(dir: &Path, names: &[&[u8]]) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let dir = dir.as_os_str().as_bytes();
    let len = dir.len() + names.iter().map(|n| n.len() + 1).sum::<usize>();
    let mut path = Vec::with_capacity(len);
    path.extend_from_slice(dir);
    for name in names {
        if !path.is_empty() && !path.ends_with(b"/") {
            path.push(b'/');
        }
        path.extend_from_slice(name);
    }
    PathBuf::from(std::ffi::OsString::from_vec(path))
}

/// The wall clock in nanoseconds since the Unix epoch; 0 for a clock set
/// before it.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The wall clock in whole seconds since the Unix epoch; 0 for a clock set
/// before it.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Locks `mutex`, taking over from a holder that panicked instead of
/// panicking in turn: what pycstore guards with a mutex (counters, queues of
/// writes and failures, caches) stays usable whatever step a panic
/// interrupted, and one panicking thread must not take down a FUSE server or
/// a whole `link`.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An I/O operation that failed on one path: what was being done, to which
/// path, and the error the system gave, kept as values until printed as
/// "failed to OP `PATH`: ERROR".
///
/// Its message already says the system's error, so as a
/// [`source`](StdError::source) it gives that error's own cause, if any (as
/// `fs-err` does): printing the chain says each cause once.
#[derive(Debug)]
pub(crate) struct PathError {
    /// What was being done, as it reads after "failed to": `stat`,
    /// `remove`, `set permissions of`.
    pub op: String,
    /// The path it was done to.
    pub path: PathBuf,
    /// The error the system gave.
    pub source: io::Error,
    /// What the user can do about it, said after the error.
    pub hint: Option<&'static str>,
}

impl PathError {
    /// `source`, which failed doing `op` to `path`.
    pub fn new(source: io::Error, op: &str, path: &Path) -> PathError {
        PathError {
            op: op.to_owned(),
            path: path.to_path_buf(),
            source,
            hint: None,
        }
    }

    /// The same, saying `hint` after the error.
    pub(crate) fn with_hint(mut self, hint: &'static str) -> PathError {
        self.hint = Some(hint);
        self
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "failed to {} `{}`: {}",
            self.op,
            self.path.display(),
            self.source
        )?;
        if let Some(hint) = self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl StdError for PathError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.source()
    }
}

impl From<PathError> for io::Error {
    fn from(err: PathError) -> io::Error {
        io::Error::new(err.source.kind(), err)
    }
}

/// `err`, which failed doing `op` to `path`, as an [`io::Error`] of the same
/// kind holding a `PathError` ("failed to OP `PATH`: ERROR").
pub fn with_path(err: io::Error, op: &str, path: &Path) -> io::Error {
    PathError::new(err, op, path).into()
}

/// Names the path of a failed I/O operation: `fs::remove_file(p).at("remove", p)`.
pub(crate) trait PathContext<T> {
    /// On failure, the error as [`with_path`] gives it.
    fn at(self, op: &str, path: &Path) -> io::Result<T>;
}

impl<T, E: Into<io::Error>> PathContext<T> for Result<T, E> {
    fn at(self, op: &str, path: &Path) -> io::Result<T> {
        self.map_err(|e| with_path(e.into(), op, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn joined_is_path_join_of_single_components() {
        for (dir, names) in [
            ("/a/b", &["c"][..]),
            ("/a/b/", &["c", "d.py"][..]),
            ("rel", &["__pycache__", "m.cpython-311.pyc"][..]),
            ("", &["ab", "cdef"][..]),
            ("/", &["x"][..]),
            ("/a", &[][..]),
        ] {
            let parts: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
            let by_join = names.iter().fold(PathBuf::from(dir), |p, n| p.join(n));
            assert_eq!(joined(Path::new(dir), &parts), by_join, "{dir:?} {names:?}");
        }
    }

    #[test]
    fn a_path_error_reads_as_before_and_keeps_its_parts() {
        let err = with_path(
            io::Error::from_raw_os_error(libc::ENOENT),
            "stat",
            Path::new("/x/y"),
        );
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            "failed to stat `/x/y`: No such file or directory (os error 2)"
        );
        let inner: &PathError = err.get_ref().unwrap().downcast_ref().unwrap();
        assert_eq!(
            (inner.op.as_str(), inner.path.as_path()),
            ("stat", Path::new("/x/y"))
        );
        assert_eq!(inner.source.raw_os_error(), Some(libc::ENOENT));
        // The message says the system's error; the chain does not repeat it.
        assert!(err.source().is_none());
        let hinted = PathError::new(
            io::ErrorKind::PermissionDenied.into(),
            "open",
            Path::new("l"),
        )
        .with_hint("ask its owner");
        assert_eq!(
            hinted.to_string(),
            "failed to open `l`: permission denied; ask its owner"
        );
    }

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let held = std::sync::Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _guard = held.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
