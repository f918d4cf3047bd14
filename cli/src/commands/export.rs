//! `pycstore export FILE`: write store entries and their objects to a
//! zstd-compressed pack, to seed another store (a CI cache, a Docker build).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use pycstore_store::pack::{self, Selection};

use crate::args::{ExportArgs, GlobalArgs};
use crate::output::{human_bytes, plural};

/// How many warnings the human output lists before counting the rest.
const SHOW_WARNINGS: usize = 20;

pub fn run(global: &GlobalArgs, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let to_stdout = args.file == Path::new("-");
    if to_stdout && args.json {
        anyhow::bail!("`--json` prints on stdout, where `-` writes the pack; give a FILE");
    }
    let selection = Selection {
        python: args.python.clone(),
        prefixes: args.prefix.clone(),
    };
    let store = super::open_existing_store(global, pycstore_store::lock::LockMode::Shared)?;
    let report = if to_stdout {
        pack::export(
            &store,
            &selection,
            std::io::stdout().lock(),
            Path::new("<stdout>"),
        )?
    } else {
        pack::export_file(&store, &selection, &args.file)?
    };

    if args.json {
        let mut stdout = std::io::stdout().lock();
        crate::output::write_json(&mut stdout, &report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut stderr = std::io::stderr().lock();
    for warning in report.warnings.iter().take(SHOW_WARNINGS) {
        writeln!(stderr, "pycstore: warning: {warning}")?;
    }
    if report.warnings.len() > SHOW_WARNINGS {
        writeln!(
            stderr,
            "pycstore: ... and {} more warnings (--json lists all)",
            report.warnings.len() - SHOW_WARNINGS
        )?;
    }
    let line = format!(
        "exported {}, {} and {} ({}) to {} ({}){} in {:.2}s",
        plural(report.entries, "entry", "entries"),
        plural(report.failures, "failure", "failures"),
        plural(report.objects, "object", "objects"),
        human_bytes(report.object_bytes),
        if to_stdout {
            "stdout".to_string()
        } else {
            format!("`{}`", args.file.display())
        },
        human_bytes(report.pack_bytes),
        if report.skipped_entries > 0 {
            format!(
                ", {} left out",
                plural(report.skipped_entries, "entry", "entries")
            )
        } else {
            String::new()
        },
        report.elapsed_seconds,
    );
    // With `-` the pack is on stdout: the summary goes with the warnings.
    if to_stdout {
        writeln!(stderr, "{line}")?;
    } else {
        writeln!(std::io::stdout().lock(), "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}
