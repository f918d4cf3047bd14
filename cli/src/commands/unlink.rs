//! `pycstore unlink`.

use std::process::ExitCode;

use crate::args::GlobalArgs;

pub fn run(_global: &GlobalArgs, _args: &crate::args::UnlinkArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`pycstore unlink` is not available in this build")
}
