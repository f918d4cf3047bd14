//! `pycstore-store`: a content-addressed store of compiled Python bytecode.
//!
//! Each compiled `.pyc` is keyed by what decides its bytes (the source's
//! blake3, the interpreter's magic number, the optimize level and any
//! compile-affecting flag), kept once as an immutable, read-only object, and
//! materialized into Python prefixes by reflink, hardlink or copy. The crate
//! holds the on-disk [`layout`], the RocksDB [`index`], the [`objects`], the
//! [`interpreter`] probe, the pyc [`format`](pyc) and a [`marshal`] checker of its body, the [`compile`] pool and the
//! [`link`](mod@link) pipeline that ties them together; [`pack`]s carry entries and
//! objects from one store to another.
//!
//! # Why each module is public
//!
//! A module is public only because another crate of the workspace uses it:
//! the binary (`cli/`), the FUSE views (`fuse/`), the integration tests
//! (`tests/`) or the benchmarks (`benches/`). Within a public module, what
//! none of them uses is `pub(crate)`.
//!
//! | module | used by |
//! |---|---|
//! | [`compile`] | fuse: a mount's compile workers (`WorkerSlot`, `Outcome`); cli: `TIMEOUT_ENV` |
//! | [`gc`] | cli: `pycstore gc`; benches: `gc` |
//! | [`index`] | fuse: a mount's lookups and writes; tests: `gc`, `pack`, `verify` read and seed an index; benches |
//! | [`interpreter`] | fuse: the interpreter of a mounted prefix (`find_in_prefix`) |
//! | [`key`] | fuse: compile keys and source digests; benches |
//! | [`layout`] | cli: the default store, whether a directory is one; [`Store`] itself |
//! | [`link`](mod@link) | cli: `pycstore link` and its progress bar ([`link::Progress`]); fuse: [`link::counter_label`] |
//! | [`lock`] | cli: the lock mode of each command; fuse: a mount's index lock; benches |
//! | [`marshal`] | fuse: checks what a worker compiled; tests: `marshal` |
//! | [`materialize`] | benches: `hot_paths` places objects |
//! | [`objects`] | fuse, tests and benches: object ids |
//! | [`pack`] | cli: `pycstore export` and `import` |
//! | [`prefix`] | cli: `pycstore status` and `unlink` |
//! | [`pyc`] | fuse: pyc headers and source hashes; benches |
//! | [`python_trust`] | cli: `--trust-python`; fuse: the checks on pycs Python writes, path steps |
//! | [`remote`] | cli: `--remote`, `push`, `keygen`; fuse: a mount's remotes; tests: `remote` |
//! | [`resolve`] | fuse: the rules every view shares (slot, object state, settled stats) |
//! | [`stats`] | cli: `pycstore stats` |
//! | [`tree`] | benches: `hot_paths` opens a destination directory |
//! | [`util`] | fuse: `lock`, `now_ns`, `with_path` |
//! | [`verify`] | cli: `pycstore verify`; benches: `gc` |
//!
//! Crate-private: `error` (its [`Error`] and [`Result`] are re-exported,
//! and `link`'s per-file errors are reported as [`link::Failure`]s),
//! `source` and `walk` (finding and reading sources, shared by `link`,
//! `prefix` and `verify`; [`MAX_SOURCE_SIZE`] is re-exported for the FUSE
//! views) and `trust` (who may use a store).
#![deny(missing_docs)]

pub mod compile;
mod error;
pub mod gc;
pub mod index;
pub mod interpreter;
pub mod key;
pub mod layout;
pub mod link;
pub mod lock;
pub mod marshal;
pub mod materialize;
pub mod objects;
pub mod pack;
pub mod prefix;
pub mod pyc;
pub mod python_trust;
pub mod remote;
pub mod resolve;
pub(crate) mod source;
pub mod stats;
pub mod tree;
pub(crate) mod trust;
pub(crate) mod uring;
pub mod util;
pub mod verify;
pub(crate) mod walk;

pub use error::{Error, Result};
pub use interpreter::Interpreter;
pub use layout::Store;
pub use link::{link, LinkOptions, LinkReport, LinkStats};
pub use materialize::LinkMode;
pub use pyc::Flavor;
pub use source::MAX_SOURCE_SIZE;
