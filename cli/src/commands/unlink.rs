//! `pycstore unlink PREFIX...`: remove the pycs pycstore placed, and the
//! `__pycache__` directories it created once they are empty; nothing else.

use std::io::Write;
use std::process::ExitCode;

use crate::args::{GlobalArgs, UnlinkArgs};
use crate::output::human_bytes;

pub fn run(global: &GlobalArgs, args: &UnlinkArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    let report = pycstore_store::prefix::unlink(&store, &args.prefixes, args.dry_run)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut out, &report)?;
    } else {
        for (path, message) in &report.failures {
            writeln!(std::io::stderr(), "pycstore: {}: {message}", path.display())?;
        }
        writeln!(
            out,
            "{}removed {} pycs ({}) and {} empty __pycache__ directories; {} changed since linking were left alone",
            if args.dry_run { "dry run: " } else { "" },
            report.removed,
            human_bytes(report.bytes),
            report.dirs_removed,
            report.changed
        )?;
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
