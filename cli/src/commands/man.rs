//! `pycstore man`: man pages (roff) from the clap definitions.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use crate::args::{Cli, ManArgs};

pub fn run(args: &ManArgs) -> anyhow::Result<ExitCode> {
    let cmd = Cli::command();
    match &args.dir {
        None => {
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
        }
        Some(dir) => write_all(cmd, dir)
            .with_context(|| format!("cannot write man pages into `{}`", dir.display()))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// pycstore.1, then pycstore-SUBCOMMAND.1 for each subcommand.
fn write_all(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let name = format!("pycstore-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("pycstore {}", sub.get_name()));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        std::fs::write(dir.join(format!("{name}.1")), buf)?;
    }
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut buf)?;
    std::fs::write(dir.join("pycstore.1"), buf)?;
    Ok(())
}
