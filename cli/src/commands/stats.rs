//! `pycstore stats`.

use std::process::ExitCode;

use crate::args::GlobalArgs;

pub fn run(_global: &GlobalArgs, _args: &crate::args::StatsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`pycstore stats` is not available in this build")
}
