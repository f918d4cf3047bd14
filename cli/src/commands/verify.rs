//! `pycstore verify`.

use std::process::ExitCode;

use crate::args::GlobalArgs;

pub fn run(_global: &GlobalArgs, _args: &crate::args::VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`pycstore verify` is not available in this build")
}
