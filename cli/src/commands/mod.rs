//! One module per subcommand.

pub mod completions;
pub mod config;
pub mod export;
pub mod gc;
pub mod import;
pub mod keygen;
pub mod link;
pub mod man;
pub mod mount;
pub mod push;
pub mod stats;
pub mod status;
pub mod unlink;
pub mod unmount;
pub mod verify;

use std::path::PathBuf;

use anyhow::Context;

use pycstore_store::lock::LockMode;

use crate::args::GlobalArgs;

/// Opens the store chosen by `--store`, `PYCSTORE_DIR` or the default, for
/// use alongside other processes.
pub fn open_store(global: &GlobalArgs) -> anyhow::Result<pycstore_store::Store> {
    open_store_with(global, LockMode::Shared)
}

/// Opens the store holding its lock in `mode` (exclusive for commands that
/// delete objects).
pub fn open_store_with(
    global: &GlobalArgs,
    mode: LockMode,
) -> anyhow::Result<pycstore_store::Store> {
    let root = store_root(global)?;
    pycstore_store::Store::open_shared(&root, mode, global.shared_group.as_deref())
        .with_context(|| format!("cannot open the store at `{}`", root.display()))
}

/// The store directory: `--store`, `PYCSTORE_DIR`, or the default.
pub fn store_root(global: &GlobalArgs) -> anyhow::Result<PathBuf> {
    match &global.store {
        Some(dir) => Ok(dir.clone()),
        None => pycstore_store::layout::default_root()
            .context("no store location: set --store, PYCSTORE_DIR, XDG_CACHE_HOME or HOME"),
    }
}
