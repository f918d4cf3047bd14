//! One module per subcommand.

pub mod link;

use std::path::PathBuf;

use anyhow::Context;

use crate::args::GlobalArgs;

/// Opens the store chosen by `--store`, `PYCSTORE_DIR` or the default.
pub fn open_store(global: &GlobalArgs) -> anyhow::Result<pycstore_store::Store> {
    let root: PathBuf = match &global.store {
        Some(dir) => dir.clone(),
        None => pycstore_store::layout::default_root()
            .context("no store location: set --store, PYCSTORE_DIR, XDG_CACHE_HOME or HOME")?,
    };
    pycstore_store::Store::open(&root)
        .with_context(|| format!("cannot open the store at `{}`", root.display()))
}
