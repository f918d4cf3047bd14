//! `pycstore status`.

use std::process::ExitCode;

use crate::args::GlobalArgs;

pub fn run(_global: &GlobalArgs, _args: &crate::args::StatusArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`pycstore status` is not available in this build")
}
