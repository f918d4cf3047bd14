//! `pycstore export`.

use std::process::ExitCode;

use crate::args::GlobalArgs;

pub fn run(_global: &GlobalArgs, _args: &crate::args::ExportArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`pycstore export` is not available in this build")
}
