//! `pycstore status PREFIX...`: per interpreter, how many sources have a pyc
//! from the store, a foreign valid pyc, a stale pyc, or none.

use std::io::Write;
use std::process::ExitCode;

use pycstore_store::lock::LockMode;
use pycstore_store::prefix::StatusOptions;

use crate::args::{GlobalArgs, StatusArgs};

pub fn run(global: &GlobalArgs, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    // Before the store is opened: a bad remote exits 2 having read nothing.
    let remotes = crate::remote::remotes(&args.remote)?;
    let root = super::store_root(global)?;
    // Before the first `link` there is no store, and nothing is from it:
    // the report is that of an empty store, made aside and thrown away, so
    // that no store is created where `status` looked.
    let (store, _scratch) = if pycstore_store::layout::is_store(&root) {
        let store = super::open_existing_store(global, LockMode::Shared)?;
        (store, None)
    } else {
        eprintln!(
            "pycstore: there is no store at `{}` yet: no pyc is from it",
            root.display()
        );
        let scratch = tempfile::Builder::new()
            .prefix("pycstore-status-")
            .tempdir()?;
        let store =
            pycstore_store::Store::open_with(&scratch.path().join("store"), LockMode::Shared)?;
        (store, Some(scratch))
    };
    let options = StatusOptions {
        python: args.python.clone(),
        optimize: args.optimize.clone(),
        flavor: super::link::flavor(args.invalidation_mode),
        excludes: args.exclude.clone(),
        remotes: remotes.clone(),
    };
    let report = pycstore_store::prefix::status(&store, &args.prefixes, &options)?;
    // Status writes nothing: the remotes' counters go to the report only.
    for message in remotes.iter().flat_map(|r| r.take_warnings()) {
        eprintln!("pycstore: warning: {message}");
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut out, &report)?;
    } else {
        writeln!(out, "{} sources", report.sources)?;
        for (label, c) in &report.interpreters {
            let from_remote = if remotes.is_some() {
                format!(", {} of the stale and missing from a remote", c.from_remote)
            } else {
                String::new()
            };
            writeln!(
                out,
                "{label}: {} pycs: {} from the store, {} foreign, {} stale, {} missing ({} do not compile){from_remote}",
                c.pycs, c.from_store, c.foreign, c.stale, c.missing, c.does_not_compile
            )?;
        }
        for r in &report.remotes {
            writeln!(out, "remote {}", crate::remote::summary(r))?;
        }
        for path in &report.unreadable {
            writeln!(
                std::io::stderr(),
                "pycstore: {}: cannot be read",
                path.display()
            )?;
        }
    }
    Ok(if report.unreadable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
