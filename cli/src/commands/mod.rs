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

/// Opens the store for a command that only reads it or cleans it up
/// (`stats`, `verify`, `gc`, `status`, `unlink`, `export`): where there is
/// none, it says so, and creates nothing.
pub fn open_existing_store(
    global: &GlobalArgs,
    mode: LockMode,
) -> anyhow::Result<pycstore_store::Store> {
    let root = store_root(global)?;
    match pycstore_store::Store::open_existing(&root, mode) {
        Ok(store) => Ok(store),
        Err(pycstore_store::Error::NoStore { .. }) => anyhow::bail!(
            "there is no store at `{}` ({}); `pycstore link` creates one",
            root.display(),
            match &global.store_from {
                Some(from) => format!("from {from}"),
                None => "the default; --store or PYCSTORE_DIR names another".to_string(),
            }
        ),
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("cannot open the store at `{}`", root.display())))
        }
    }
}

/// Compile processes per interpreter: `--jobs N`, where 0 (or no flag)
/// means the number of CPUs.
pub fn jobs(jobs: Option<usize>) -> usize {
    match jobs {
        Some(n) if n > 0 => n,
        _ => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

/// The store directory: `--store`, `PYCSTORE_DIR`, or the default.
pub fn store_root(global: &GlobalArgs) -> anyhow::Result<PathBuf> {
    match &global.store {
        Some(dir) => Ok(dir.clone()),
        None => pycstore_store::layout::default_root()
            .context("no store location: set --store, PYCSTORE_DIR, XDG_CACHE_HOME or HOME"),
    }
}
