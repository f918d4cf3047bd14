//! `pycstore import`.

use std::process::ExitCode;

use crate::args::GlobalArgs;

pub fn run(_global: &GlobalArgs, _args: &crate::args::ImportArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`pycstore import` is not available in this build")
}
