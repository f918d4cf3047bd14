//! `pycstore stats`: what the store holds and how it was used since the last
//! `--zero`.

use std::io::Write;
use std::process::ExitCode;

use crate::args::{GlobalArgs, StatsArgs};
use crate::output::human_bytes;

pub fn run(global: &GlobalArgs, args: &StatsArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_existing_store(global, pycstore_store::lock::LockMode::Shared)?;
    let stats = pycstore_store::stats::stats(&store, args.zero)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut out, &stats)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "store                {}", stats.store.display())?;
    writeln!(out, "objects              {}", stats.objects)?;
    writeln!(
        out,
        "object size          {} ({} on disk)",
        human_bytes(stats.object_bytes),
        human_bytes(stats.disk_bytes)
    )?;
    writeln!(out, "entries              {}", stats.entries)?;
    // After gc evicted objects still linked into prefixes, the pycs are
    // still there (and still pycstore's): their size stays, and the part
    // the store still holds is said apart.
    let evicted = if stats.linked_stored_bytes < stats.logical_bytes {
        format!(
            ", {} of them no longer in the store",
            human_bytes(stats.logical_bytes - stats.linked_stored_bytes)
        )
    } else {
        String::new()
    };
    writeln!(
        out,
        "linked pycs          {} ({} as separate files{evicted}, dedup ratio {:.2})",
        stats.linked_pycs,
        human_bytes(stats.logical_bytes),
        stats.dedup_ratio
    )?;
    writeln!(out, "known failures       {}", stats.known_failures)?;
    if stats.usage.is_empty() {
        writeln!(out, "usage                none recorded")?;
    }
    for (label, c) in &stats.usage {
        let wanted = c.hits + c.misses;
        let rate = if wanted > 0 {
            100.0 * c.hits as f64 / wanted as f64
        } else {
            0.0
        };
        writeln!(
            out,
            "{label:<20} {} hits, {} misses ({rate:.1}% hit rate), {} compiles, {} failures",
            c.hits, c.misses, c.compiles, c.failures
        )?;
    }
    for (label, r) in &stats.remotes {
        writeln!(
            out,
            "remote {label}: {} hits, {} misses, {} uploads, {} requests, {} in, {} out, {} errors, {} rejected",
            r.hits,
            r.misses,
            r.uploads,
            r.requests,
            human_bytes(r.bytes_in),
            human_bytes(r.bytes_out),
            r.errors,
            r.rejected
        )?;
    }
    if args.zero {
        writeln!(out, "counters reset")?;
    }
    Ok(ExitCode::SUCCESS)
}
