//! `pycstore config`: the effective settings and where each came from.

use std::io::Write;
use std::process::ExitCode;

use crate::args::ConfigArgs;
use crate::config;

pub fn run(args: &ConfigArgs) -> anyhow::Result<ExitCode> {
    let report = config::report().expect("settings resolved before commands run");
    let mut out = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut out, &config::report_json(report))?;
        return Ok(ExitCode::SUCCESS);
    }
    let state = match (report.file_found, report.file_from_env) {
        (true, true) => "named by PYCSTORE_CONFIG",
        (true, false) => "found",
        (false, _) => "not found",
    };
    writeln!(out, "# config file: {} ({state})", report.file.display())?;
    let width = report
        .settings
        .iter()
        .map(|s| s.key.len())
        .max()
        .unwrap_or(0);
    for s in &report.settings {
        let line = match &s.value {
            config::toml_like::Value::Unset => format!("# {:width$} (unset)", s.key),
            value => format!("{:width$} = {value}", s.key),
        };
        writeln!(out, "{line:<48} # {}", s.source)?;
    }
    Ok(ExitCode::SUCCESS)
}
