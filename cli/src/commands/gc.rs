//! `pycstore gc`.

use std::process::ExitCode;

use crate::args::GlobalArgs;

pub fn run(_global: &GlobalArgs, _args: &crate::args::GcArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`pycstore gc` is not available in this build")
}
