//! `pycstore unlink PREFIX...`: remove the pycs pycstore placed, and the
//! `__pycache__` directories it created once they are empty; nothing else.

use std::io::Write;
use std::process::ExitCode;

use crate::args::{GlobalArgs, UnlinkArgs};
use crate::output::{human_bytes, plural};

pub fn run(global: &GlobalArgs, args: &UnlinkArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_existing_store(global, pycstore_store::lock::LockMode::Shared)?;
    let report = pycstore_store::prefix::unlink(&store, &args.prefixes, args.dry_run)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut out, &report)?;
    } else {
        for (path, message) in &report.failures {
            writeln!(std::io::stderr(), "pycstore: {}: {message}", path.display())?;
        }
        let (removed, left) = match (args.dry_run, report.changed) {
            (true, _) => ("dry run: would remove", "would be left alone"),
            (false, 1) => ("removed", "was left alone"),
            (false, _) => ("removed", "were left alone"),
        };
        writeln!(
            out,
            "{removed} {} ({}) and {}; {} changed since linking {left}",
            plural(report.removed, "pyc", "pycs"),
            human_bytes(report.bytes),
            plural(
                report.dirs_removed,
                "empty __pycache__ directory",
                "empty __pycache__ directories"
            ),
            report.changed
        )?;
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
