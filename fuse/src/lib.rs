//! `pycstore-fuse`: the store's pycs for environments that cannot be
//! written, served through FUSE.
//!
//! Shared software stacks, read-only container layers, Nix-style stores and
//! NFS-mounted environments cannot get a `__pycache__` written, so every
//! process compiles every module it imports. A mount serves the store's
//! pycs there instead, in one of two views:
//!
//! - overlay ([`View::Overlay`]): a read-only mirror of a prefix whose
//!   directories of sources also hold a `__pycache__` with the pycs of the
//!   mount's interpreters; it may be mounted over the prefix itself (the
//!   files underneath stay reachable through a descriptor opened before
//!   mounting), so paths, shebangs and `pyvenv.cfg` stay valid;
//! - pycache prefix ([`View::PycachePrefix`]): a tree for
//!   `PYTHONPYCACHEPREFIX`, mapping each pyc path back to its source, and
//!   storing (after checking them) the pycs Python writes there.
//!
//! A pyc the store lacks is compiled on first access by the same
//! long-lived workers `link` uses; concurrent readers of one miss wait for
//! one compile; a source that does not compile has no pyc, and Python
//! compiles it in memory as usual. See [`mount()`] and [`Mount::run`].
#![deny(missing_docs)]

mod fs;
mod mount;
mod pycs;
mod stats;
mod under;

use std::io;
use std::path::PathBuf;

pub use mount::{mount, unmount, Mount, MountOptions, MountReport, View};

/// What can go wrong mounting, serving or unmounting a view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed (index, probe, objects).
    #[error(transparent)]
    Store(#[from] pycstore_store::Error),
    /// The kernel or `fusermount3` refused the mount.
    #[error("cannot mount on `{path}`: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A file or directory the view needs could not be used. The message
    /// is the I/O error's (not repeated as its source).
    #[error("`{path}`: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// The mount point or the prefix of an overlay is missing, is not a
    /// directory, or cannot hold the view (a mount point inside the
    /// overlay's prefix).
    #[error("{what} `{path}` {problem}")]
    NotADirectory {
        /// `the mount point` or `the prefix`.
        what: &'static str,
        /// The path as given, made absolute.
        path: PathBuf,
        /// `does not exist…` or `is not a directory`.
        problem: &'static str,
    },
    /// `unmount` was asked for a directory that is no pycstore mount.
    #[error("`{0}` is not a pycstore mount (see /proc/self/mountinfo)")]
    NotMounted(PathBuf),
    /// The unmount failed.
    #[error("cannot unmount `{path}`: {message}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// No interpreter was given and none could be found.
    #[error("no Python interpreter: {0}")]
    NoPython(String),
}

/// Locks `m`; a lock whose holder panicked is used as it is (every
/// structure behind one stays consistent between statements).
pub(crate) use pycstore_store::util::lock;
