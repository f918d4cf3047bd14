//! `pycstore link PREFIX...`: materialize pycs for every source of the prefixes.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use pycstore_store::{Flavor, LinkMode, LinkOptions};

use crate::args::{GlobalArgs, InvalidationMode, LinkArgs, LinkModeArg};
use crate::output::{human_bytes, print_problems, Bar, SHOW_PROBLEMS};

pub fn run(global: &GlobalArgs, args: &LinkArgs) -> anyhow::Result<ExitCode> {
    let mut options = settings(args);
    options.remotes = crate::remote::remotes(&args.remote)?;
    let store = super::open_store(global)?;
    let bar = Bar::new(!args.quiet && !args.json && std::io::stderr().is_terminal());
    let report = pycstore_store::link(&store, &args.prefixes, &options, &bar)?;
    bar.finish();

    let mut failures = report.failures.clone();
    failures.sort_by(|a, b| a.path.cmp(&b.path));
    let mut stdout = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut stdout, &report)?;
    } else {
        print_problems(
            failures
                .iter()
                .map(|f| (f.path.as_path(), f.message.as_str())),
            if args.quiet {
                usize::MAX
            } else {
                SHOW_PROBLEMS
            },
            "failures",
        )?;
        if !args.quiet {
            let s = &report.stats;
            let modes: Vec<&str> = report.link_modes.iter().map(|m| m.as_str()).collect();
            writeln!(
                stdout,
                "{}{} sources, {} pycs: {} up to date, {} linked from the store, {}{} compiled, {} failed{} in {:.2}s",
                if options.dry_run { "dry run: " } else { "" },
                s.sources,
                s.pycs,
                s.up_to_date,
                s.hits,
                if options.remotes.is_some() { format!("{} fetched from remotes, ", s.fetched) } else { String::new() },
                s.compiled,
                s.failed,
                if s.skipped > 0 { format!(", {} skipped (changed during the run)", s.skipped) } else { String::new() },
                report.elapsed_seconds,
            )?;
            if s.replaced_other_mode > 0 {
                writeln!(
                    stdout,
                    "replaced {} pycs made in another invalidation mode with {} ones \
                     (pass --invalidation-mode to keep another mode)",
                    s.replaced_other_mode,
                    options.flavor.as_str()
                )?;
            }
            if s.bytes_shared + s.bytes_copied > 0 {
                writeln!(
                    stdout,
                    "placed {} sharing the store's blocks, {} copied (link mode: {})",
                    human_bytes(s.bytes_shared),
                    human_bytes(s.bytes_copied),
                    modes.join(", ")
                )?;
            }
        }
    }
    Ok(if report.stats.failed > 0 || !report.failures.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn settings(args: &LinkArgs) -> LinkOptions {
    LinkOptions {
        python: args.python.clone(),
        optimize: args.optimize.clone(),
        flavor: flavor(args.invalidation_mode),
        link_mode: match args.link_mode {
            LinkModeArg::Auto => LinkMode::Auto,
            LinkModeArg::Reflink => LinkMode::Reflink,
            LinkModeArg::Hardlink => LinkMode::Hardlink,
            LinkModeArg::Copy => LinkMode::Copy,
        },
        jobs: super::jobs(args.jobs),
        excludes: args.exclude.clone(),
        dry_run: args.dry_run,
        timeout: (args.compile_timeout > 0).then(|| Duration::from_secs(args.compile_timeout)),
        max_source_size: args.max_source_size,
        remotes: None,
    }
}

/// The store's flavor of an `--invalidation-mode`.
pub fn flavor(mode: InvalidationMode) -> Flavor {
    match mode {
        InvalidationMode::CheckedHash => Flavor::CheckedHash,
        InvalidationMode::UncheckedHash => Flavor::UncheckedHash,
        InvalidationMode::Timestamp => Flavor::Timestamp,
    }
}
