//! Typed errors of the store library. Every variant names the path it is
//! about, so the binary can print one line a user can act on.

use std::io;
use std::path::PathBuf;

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
    pub(crate) fn index(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        Error::Index {
            path: path.into(),
            message: err.to_string(),
        }
    }
}
