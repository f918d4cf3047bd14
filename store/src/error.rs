//! Typed errors of the store library. Every variant names the path it is
//! about, so the binary can print one line a user can act on. [`Error`]
//! ends a command; a [`FileError`] is one file `link` could not do, which
//! the run reports and goes on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while opening or using the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed; the message of `fs-err` names the path.
    #[error(transparent)]
    Io(#[from] io::Error),

    /// The RocksDB index could not be opened or used.
    #[error("the store index at `{path}` failed: {message}")]
    Index {
        /// The index directory.
        path: PathBuf,
        /// RocksDB's own message.
        message: String,
    },

    /// The index could not be opened, written or repaired for lack of disk
    /// space. It is not damaged, and nothing was changed.
    #[error(
        "cannot {action} the index: no space left on `{path}` ({detail}); free some space on \
         that filesystem and run the command again (the index is kept as it is)"
    )]
    IndexNoSpace {
        /// The index directory.
        path: PathBuf,
        /// `open`, `write` or `repair`.
        action: &'static str,
        /// How much is free (and needed).
        detail: String,
    },

    /// What a session wrote could not be flushed from the index's memory
    /// to its tables at the end of the session. It is not lost: it is in
    /// the write-ahead log, which the next session that can write flushes.
    #[error(
        "cannot flush the index at `{path}` ({detail}); what this run recorded is kept in its \
         write-ahead log, and written by the next run{}",
        if *full {
            " once there is room: free some space on that filesystem"
        } else {
            ""
        }
    )]
    IndexFlush {
        /// The index directory.
        path: PathBuf,
        /// What failed, and where to read more.
        detail: String,
        /// The filesystem is full (of bytes or of inodes).
        full: bool,
    },

    /// An interpreter could not be probed.
    #[error("failed to probe the Python interpreter `{path}`: {message}")]
    Probe {
        /// The executable that was run.
        path: PathBuf,
        /// What went wrong, with the interpreter's stderr when there was any.
        message: String,
    },

    /// An interpreter that pycstore cannot produce pycs for.
    #[error("the Python interpreter `{path}` is not supported: {reason}")]
    Unsupported {
        /// The executable.
        path: PathBuf,
        /// Why, in words a user can act on.
        reason: String,
    },

    /// An interpreter that a user other than the caller or root can change,
    /// refused because the caller is root or the store is shared.
    #[error(
        "refusing to run the Python interpreter `{path}`: `{step}` {reason}, so that user \
         could run code as you and put bytecode into the store that other environments \
         would import; use an interpreter only root or you can change (`--python PATH`), \
         or pass `--trust-python` (PYCSTORE_TRUST_PYTHON=1) to run it anyway, keeping what \
         it compiles for it alone"
    )]
    UntrustedInterpreter {
        /// The executable as given.
        path: PathBuf,
        /// The step of its path (or of its standard library) others can change.
        step: PathBuf,
        /// Why: who owns it, or who can write it.
        reason: String,
    },

    /// No interpreter could be found for a prefix.
    #[error(
        "no Python interpreter found in `{prefix}` (looked for bin/python3, bin/python, \
         bin/pypy3, bin/pypy, bin/python3.N); pass `--python PATH`"
    )]
    NoInterpreter {
        /// The prefix that was searched.
        prefix: PathBuf,
    },

    /// A prefix that is not a directory.
    #[error("`{prefix}` {problem}")]
    NotAPrefix {
        /// The prefix as given.
        prefix: PathBuf,
        /// What it is instead, and what to pass.
        problem: String,
    },

    /// A command that only reads the store found none where it looked.
    #[error("there is no store at `{path}` (`pycstore link` creates one)")]
    NoStore {
        /// Where the store was looked for.
        path: PathBuf,
    },

    /// A store that is not safe to use.
    #[error("refusing to use the store at `{path}`: {reason}")]
    Untrusted {
        /// The store directory.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },

    /// An exclude pattern did not parse.
    #[error("invalid exclude pattern `{pattern}`: {message}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// The glob parser's message.
        message: String,
    },

    /// A pack that is not a whole, intact pycstore pack; nothing of it was
    /// added to the store.
    #[error("rejected the pack `{path}`: {message}; nothing was imported")]
    Pack {
        /// The pack file (`<stdin>` when read from standard input).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    pub(crate) fn index(path: impl Into<PathBuf>, err: impl fmt::Display) -> Self {
        Error::Index {
            path: path.into(),
            message: err.to_string(),
        }
    }
}

/// What `link` was doing to a file when it failed (see [`FileError`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Stat'ing a source.
    Stat,
    /// Reading: a source's bytes, a directory's entries, a prefix.
    Read,
    /// Looking a source's hash or its pycs up in the index.
    LookUp,
    /// Opening the `__pycache__` directory at this path.
    OpenPycache(PathBuf),
    /// Making it.
    MakePycache(PathBuf),
    /// Compiling a source.
    Compile,
    /// Writing the store object of a pyc.
    Store,
    /// Placing a pyc into its `__pycache__`.
    Place,
    /// Recording in the index what a run did.
    Record,
}

impl Op {
    /// The other file an operation was on, when it was not the one the
    /// failure is reported under (a source's `__pycache__`).
    fn on(&self) -> Option<&Path> {
        match self {
            Op::OpenPycache(dir) | Op::MakePycache(dir) => Some(dir),
            _ => None,
        }
    }
}

/// Why a file failed (see [`FileError`]). Clone, so that one failure (a
/// `__pycache__` that cannot be opened, a compile worker that died) can be
/// reported under every file it concerns.
#[derive(Clone, Debug)]
pub(crate) enum Cause {
    /// The system's error.
    Io(Arc<io::Error>),
    /// The index's error.
    Index(Arc<Error>),
    /// Not a regular file (a FIFO, a device, a socket): never read.
    NotRegular,
    /// Not a directory where one was expected.
    NotADirectory,
    /// A symlink where pycstore would write through it.
    Symlink,
    /// Larger than the source size limit.
    TooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// It changed or vanished while it was read.
    Changed,
    /// A source whose pyc has no name (no `NAME.py`).
    NotAModuleName,
    /// The interpreter refuses to compile the source: a syntax error, a bad
    /// encoding (deterministic, and remembered).
    Rejected {
        /// The interpreter's cache tag.
        cache_tag: String,
        /// What the interpreter said, as it said it.
        message: String,
    },
    /// The compile worker crashed, hung or could not start: not the
    /// source's fault.
    Worker(Arc<crate::compile::WorkerError>),
    /// What the compile worker answered is not a loadable pyc.
    Unloadable(crate::marshal::BodyError),
    /// The directory could not be opened.
    Unopened,
    /// An object this run wrote cannot be read back as it was written.
    DamagedObject,
}

impl From<io::Error> for Cause {
    fn from(e: io::Error) -> Cause {
        Cause::Io(Arc::new(e))
    }
}

impl From<rustix::io::Errno> for Cause {
    fn from(e: rustix::io::Errno) -> Cause {
        Cause::Io(Arc::new(e.into()))
    }
}

impl From<Error> for Cause {
    fn from(e: Error) -> Cause {
        Cause::Index(Arc::new(e))
    }
}

/// One file that `link` could not do: the path it is reported under (a
/// source, a directory of a prefix, the index), what was being done, and
/// why. Kept as a value until it is reported as a
/// [`Failure`](crate::link::Failure), whose message is
/// [`FileError::message`].
#[derive(Clone, Debug)]
pub(crate) struct FileError {
    /// The file the failure is reported under.
    pub(crate) path: PathBuf,
    /// What was being done.
    pub(crate) op: Op,
    /// Why it failed.
    pub(crate) cause: Cause,
}

impl FileError {
    /// `cause`, which made `op` fail for `path`.
    pub(crate) fn new(path: impl Into<PathBuf>, op: Op, cause: impl Into<Cause>) -> FileError {
        FileError {
            path: path.into(),
            op,
            cause: cause.into(),
        }
    }

    /// The same failure reported under `path`: a `__pycache__` that failed
    /// under each source whose pyc it was to hold, a compile that failed
    /// under each source of the same bytes.
    pub(crate) fn at(mut self, path: &Path) -> FileError {
        if self.path != path {
            self.path = path.to_path_buf();
        }
        self
    }

    /// What is said after the path: the message of its `Failure`.
    pub(crate) fn message(&self) -> Message<'_> {
        Message(self)
    }
}

/// The message of a [`FileError`], without its path.
pub(crate) struct Message<'a>(&'a FileError);

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let FileError { op, cause, .. } = self.0;
        // What the failure is said of, when it is another file than the one
        // reported ("`DIR/__pycache__` is a symlink").
        let on = op.on().map(|p| format!("`{}` ", p.display()));
        let on = on.as_deref().unwrap_or("");
        match cause {
            Cause::Io(e) => match op {
                Op::Stat => write!(f, "cannot stat: {e}"),
                Op::OpenPycache(dir) => write!(f, "cannot open `{}`: {e}", dir.display()),
                Op::MakePycache(dir) => write!(f, "cannot create `{}`: {e}", dir.display()),
                // The store's own errors name the path they are about.
                Op::Store | Op::Place => write!(f, "{e}"),
                _ => write!(f, "cannot read: {e}"),
            },
            Cause::Index(e) if *op == Op::Record && !matches!(**e, Error::IndexFlush { .. }) => {
                write!(f, "{e}; what this run compiled is not recorded")
            }
            Cause::Index(e) => write!(f, "{e}"),
            Cause::NotRegular => {
                f.write_str("not a regular file (a FIFO, device or socket): skipped")
            }
            Cause::NotADirectory if on.is_empty() => f.write_str("not a directory"),
            Cause::NotADirectory => write!(f, "{on}exists and is not a directory"),
            Cause::Symlink => write!(
                f,
                "{on}is a symlink; pycstore never writes through symlinks \
                 (remove it, or exclude the directory)"
            ),
            Cause::TooLarge { size, limit } => write!(
                f,
                "is larger than the source size limit ({size} bytes, limit {limit}); \
                 skipped (raise it with --max-source-size, or exclude the file)"
            ),
            Cause::Changed => f.write_str("changed while being linked; run again"),
            Cause::NotAModuleName => f.write_str("not a module file name"),
            Cause::Rejected { cache_tag, message } => {
                write!(f, "does not compile for {cache_tag}: {message}")
            }
            Cause::Worker(e) => write!(f, "{e}"),
            Cause::Unloadable(e) => write!(f, "the compiler's output is not a loadable pyc: {e}"),
            Cause::Unopened => write!(f, "{on}could not be opened"),
            Cause::DamagedObject => f.write_str("the object compiled by this run is unreadable"),
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message())
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Io(e) => Some(&**e),
            Cause::Index(e) => Some(&**e),
            Cause::Worker(e) => Some(&**e),
            Cause::Unloadable(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::time::Duration;

    use super::*;
    use crate::compile::WorkerError;
    use crate::marshal::BodyError;

    fn denied() -> io::Error {
        io::Error::from_raw_os_error(libc::EACCES)
    }

    /// The messages `link` reports (and `--json` lists) read word for word
    /// as they always have: users and tests match them.
    #[test]
    fn file_errors_read_as_link_reports_them() {
        let dir = PathBuf::from("/p/pkg/__pycache__");
        let index = || Error::index("/s/index-v1", "boom");
        let worker = |e: WorkerError| Cause::Worker(Arc::new(e));
        let cases = [
            (
                Op::Stat,
                denied().into(),
                "cannot stat: Permission denied (os error 13)",
            ),
            (
                Op::Read,
                denied().into(),
                "cannot read: Permission denied (os error 13)",
            ),
            (
                Op::OpenPycache(dir.clone()),
                denied().into(),
                "cannot open `/p/pkg/__pycache__`: Permission denied (os error 13)",
            ),
            (
                Op::MakePycache(dir.clone()),
                denied().into(),
                "cannot create `/p/pkg/__pycache__`: Permission denied (os error 13)",
            ),
            (
                Op::Place,
                denied().into(),
                "Permission denied (os error 13)",
            ),
            (
                Op::Store,
                denied().into(),
                "Permission denied (os error 13)",
            ),
            (
                Op::Read,
                Cause::NotRegular,
                "not a regular file (a FIFO, device or socket): skipped",
            ),
            (Op::Read, Cause::NotADirectory, "not a directory"),
            (
                Op::OpenPycache(dir.clone()),
                Cause::NotADirectory,
                "`/p/pkg/__pycache__` exists and is not a directory",
            ),
            (
                Op::OpenPycache(dir.clone()),
                Cause::Symlink,
                "`/p/pkg/__pycache__` is a symlink; pycstore never writes through symlinks \
                 (remove it, or exclude the directory)",
            ),
            (
                Op::OpenPycache(dir.clone()),
                Cause::Unopened,
                "`/p/pkg/__pycache__` could not be opened",
            ),
            (
                Op::Read,
                Cause::TooLarge { size: 10, limit: 5 },
                "is larger than the source size limit (10 bytes, limit 5); skipped (raise it \
                 with --max-source-size, or exclude the file)",
            ),
            (
                Op::Read,
                Cause::Changed,
                "changed while being linked; run again",
            ),
            (Op::LookUp, Cause::NotAModuleName, "not a module file name"),
            (
                Op::Compile,
                Cause::Rejected {
                    cache_tag: "cpython-311".into(),
                    message: "SyntaxError: invalid syntax (m.py, line 1)".into(),
                },
                "does not compile for cpython-311: SyntaxError: invalid syntax (m.py, line 1)",
            ),
            (
                Op::Compile,
                worker(WorkerError::Timeout {
                    limit: Duration::from_secs(3),
                }),
                "compiling took longer than 3s (set PYCSTORE_COMPILE_TIMEOUT to change the \
                 limit, 0 for none)",
            ),
            (
                Op::Compile,
                worker(WorkerError::Died {
                    status: "signal: 9 (SIGKILL)".into(),
                    stderr: "boom".into(),
                }),
                "the compile worker died (signal: 9 (SIGKILL)) while compiling this file; \
                 its stderr: boom",
            ),
            (
                Op::Compile,
                worker(WorkerError::Garbled {
                    source: io::Error::other("garbled reply \"x\\n\""),
                    stderr: String::new(),
                }),
                "the compile worker failed: garbled reply \"x\\n\"",
            ),
            (
                Op::Compile,
                worker(WorkerError::Start {
                    executable: "/x/python3".into(),
                    source: io::ErrorKind::NotFound.into(),
                }),
                "failed to start `/x/python3`: entity not found",
            ),
            (
                Op::Compile,
                worker(WorkerError::NoHandshake {
                    executable: "/x/python3".into(),
                    stderr: "Fatal Python error".into(),
                }),
                "`/x/python3` did not start as a compile worker; its stderr: Fatal Python error",
            ),
            (
                Op::Compile,
                Cause::Unloadable(BodyError::Short { len: 3 }),
                "the compiler's output is not a loadable pyc: it is 3 bytes, too short for a \
                 pyc header",
            ),
            (
                Op::Place,
                Cause::DamagedObject,
                "the object compiled by this run is unreadable",
            ),
            (
                Op::LookUp,
                index().into(),
                "the store index at `/s/index-v1` failed: boom",
            ),
            (
                Op::Record,
                index().into(),
                "the store index at `/s/index-v1` failed: boom; what this run compiled is \
                 not recorded",
            ),
        ];
        for (op, cause, expected) in cases {
            let e = FileError::new("/p/pkg/m.py", op, cause);
            assert_eq!(e.message().to_string(), expected);
            assert_eq!(e.to_string(), format!("/p/pkg/m.py: {expected}"));
        }
    }

    #[test]
    fn a_file_error_keeps_its_cause_and_moves_to_another_path() {
        let e = FileError::new(
            "/p/pkg",
            Op::OpenPycache("/p/pkg/__pycache__".into()),
            denied(),
        );
        let io = e.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(io.raw_os_error(), Some(libc::EACCES));
        let moved = e.clone().at(Path::new("/p/pkg/m.py"));
        assert_eq!(moved.path, Path::new("/p/pkg/m.py"));
        assert_eq!(moved.message().to_string(), e.message().to_string());
        assert!(FileError::new("/p/m.py", Op::Read, Cause::Changed)
            .source()
            .is_none());
    }
}
