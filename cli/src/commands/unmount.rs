//! `pycstore unmount MOUNTPOINT`: end a view mounted by `pycstore mount`.

use std::process::ExitCode;

use anyhow::Context;

use crate::args::UnmountArgs;

pub fn run(args: &UnmountArgs) -> anyhow::Result<ExitCode> {
    pycstore_fuse::unmount(&args.mountpoint, args.lazy)
        .with_context(|| format!("cannot unmount `{}`", args.mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}
