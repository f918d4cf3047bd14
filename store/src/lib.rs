//! `pycstore-store`: a content-addressed store of compiled Python bytecode.
//!
//! Each compiled `.pyc` is keyed by what decides its bytes (the source's
//! blake3, the interpreter's magic number, the optimize level and any
//! compile-affecting flag), kept once as an immutable, read-only object, and
//! materialized into Python prefixes by reflink, hardlink or copy. The crate
//! holds the on-disk [`layout`], the RocksDB [`index`], the [`objects`], the
//! [`interpreter`] probe, the pyc [`format`](pyc) and a [`marshal`] checker of its body, the [`compile`] pool and the
//! [`link`] pipeline that ties them together; [`pack`]s carry entries and
//! objects from one store to another.
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
