//! `pycstore gc`: evict least recently used objects to a size or an age,
//! and remove orphans, old layout buckets and temp leftovers.

use std::io::Write;
use std::process::ExitCode;

use pycstore_store::gc::{GcOptions, GcReport};
use pycstore_store::lock::LockMode;

use crate::args::{GcArgs, GlobalArgs};
use crate::output::{human_bytes, plural, print_problems, SHOW_PROBLEMS};

pub fn run(global: &GlobalArgs, args: &GcArgs) -> anyhow::Result<ExitCode> {
    let options = GcOptions {
        max_size: args.max_size,
        older_than: args.older_than,
        dry_run: args.dry_run,
    };
    // Exclusive: nobody may be about to link an object gc deletes.
    let store = super::open_existing_store(global, LockMode::Exclusive)?;
    let report = pycstore_store::gc::gc(&store, &options)?;

    if let Some(aside) = report.set_aside_indexes.first() {
        if report.stats.orphans_kept > 0 {
            eprintln!(
                "pycstore: warning: kept {} orphaned {}: the index set aside at `{}` may name \
                 {} (run `pycstore verify` to see the store's state); once you no longer need \
                 it, remove it (`rm -r {}`) and `pycstore gc` collects orphans again",
                report.stats.orphans_kept,
                if report.stats.orphans_kept == 1 {
                    "object"
                } else {
                    "objects"
                },
                aside.display(),
                if report.stats.orphans_kept == 1 {
                    "it"
                } else {
                    "them"
                },
                aside.display()
            );
        }
    }
    let mut stdout = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut stdout, &report)?;
    } else {
        print_problems(
            report
                .failures
                .iter()
                .map(|f| (f.path.as_path(), f.message.as_str())),
            SHOW_PROBLEMS,
            "failures",
        )?;
        writeln!(stdout, "{}", summary(&report))?;
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One line: what went, what it freed, what is left.
fn summary(report: &GcReport) -> String {
    let s = &report.stats;
    let (evict, free, left, remove) = if report.dry_run {
        (
            "dry run: would evict",
            "freeing",
            "would leave",
            "would remove",
        )
    } else {
        ("evicted", "freeing", "left", "removed")
    };
    let mut why = Vec::new();
    if s.evicted_orphans > 0 {
        why.push(format!("{} orphaned", s.evicted_orphans));
    }
    if s.evicted_linked > 0 {
        why.push(format!(
            "{} still linked into prefixes, which frees nothing",
            s.evicted_linked
        ));
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({})", why.join(", "))
    };
    let mut line = format!(
        "{evict} {}{why} and {}, {free} {} of disk ({} of pycs); {left} {} in {}",
        plural(s.evicted, "object", "objects"),
        plural(s.entries_removed, "index entry", "index entries"),
        human_bytes(s.freed_physical),
        human_bytes(s.freed_logical),
        plural(s.objects_after, "object", "objects"),
        human_bytes(s.bytes_after),
    );
    if s.old_layouts_removed > 0 {
        let names: Vec<String> = report
            .old_layouts
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        line.push_str(&format!(
            "; {remove} {} ({})",
            names.join(", "),
            human_bytes(s.old_layouts_bytes)
        ));
    }
    if s.tmp_removed > 0 {
        line.push_str(&format!(
            "; {remove} {}",
            plural(s.tmp_removed, "temp file", "temp files")
        ));
    }
    line.push_str(&format!(" in {:.2}s", report.elapsed_seconds));
    line
}
