//! `pycstore verify [--repair]`: check every object against its name and
//! the index against the objects; repair what is broken.

use std::io::Write;
use std::process::ExitCode;

use pycstore_store::lock::LockMode;
use pycstore_store::verify::{IndexState, VerifyOptions, VerifyReport};

use crate::args::{GlobalArgs, VerifyArgs};
use crate::output::{human_bytes, plural, print_problems, SHOW_PROBLEMS};

pub fn run(global: &GlobalArgs, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let options = VerifyOptions {
        repair: args.repair,
    };
    // Repair deletes objects: nobody may be about to link one.
    let mode = if args.repair {
        LockMode::Exclusive
    } else {
        LockMode::Shared
    };
    let store = super::open_existing_store(global, mode)?;
    let report = pycstore_store::verify::verify(&store, &options)?;

    let mut stdout = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut stdout, &report)?;
    } else {
        print_problems(
            report
                .problems
                .iter()
                .map(|p| (p.path.as_path(), p.message.as_str())),
            SHOW_PROBLEMS,
            "problems",
        )?;
        writeln!(stdout, "{}", summary(&report))?;
    }
    Ok(if report.broken() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One line: what was checked, what is wrong, what repair did.
fn summary(report: &VerifyReport) -> String {
    let s = &report.stats;
    let found: Vec<String> = [
        (s.corrupt, "damaged object", "damaged objects"),
        (
            s.bad_permissions,
            "object with wrong permissions",
            "objects with wrong permissions",
        ),
        (
            s.bad_owner,
            "object or shard owned by someone else",
            "objects or shards owned by someone else",
        ),
        (s.unreadable, "unreadable object", "unreadable objects"),
        (s.strays, "stray file", "stray files"),
        (s.missing_objects, "missing object", "missing objects"),
        (
            s.mismatched_entries,
            "entry that disagrees with its object",
            "entries that disagree with their objects",
        ),
        (
            s.malformed_entries,
            "undecodable entry",
            "undecodable entries",
        ),
        (
            s.damaged_links,
            "damaged pyc in a prefix",
            "damaged pycs in prefixes",
        ),
        (
            s.exposed_links,
            "pyc in a prefix sharing an exposed inode",
            "pycs in prefixes sharing an exposed inode",
        ),
    ]
    .into_iter()
    .filter(|(n, ..)| *n > 0)
    .map(|(n, one, many)| plural(n, one, many))
    .collect();
    let index = match report.index {
        IndexState::Ok => "",
        IndexState::Damaged => ", the index is damaged",
        IndexState::Repaired => ", the index was damaged",
        IndexState::Rebuilt => ", the index was damaged beyond repair",
    };
    let mut line = format!(
        "checked {} ({}) and {}: {}{index}; {}",
        plural(s.objects, "object", "objects"),
        human_bytes(s.bytes),
        plural(s.entries, "index entry", "index entries"),
        if found.is_empty() {
            "no problems".to_string()
        } else {
            found.join(", ")
        },
        plural(s.orphans, "orphaned object", "orphaned objects"),
    );
    if let Some(r) = &report.repairs {
        let mut done = Vec::new();
        match report.index {
            IndexState::Repaired => {
                done.push("rebuilt the index from what could be read".to_string())
            }
            IndexState::Rebuilt => done.push("started an empty index".to_string()),
            _ => {}
        }
        for (n, one, many) in [
            (r.objects_removed, "object removed", "objects removed"),
            (r.orphans_removed, "orphan removed", "orphans removed"),
            (r.entries_removed, "entry removed", "entries removed"),
            (r.permissions_fixed, "permission fixed", "permissions fixed"),
            (r.owners_fixed, "owner fixed", "owners fixed"),
            (
                r.links_removed,
                "damaged or exposed pyc removed from a prefix",
                "damaged or exposed pycs removed from prefixes",
            ),
        ] {
            if n > 0 {
                done.push(plural(n, one, many));
            }
        }
        line.push_str(&format!(
            "; repair: {}",
            if done.is_empty() {
                "nothing to do".to_string()
            } else {
                done.join(", ")
            }
        ));
        if report.broken() {
            line.push_str(" (some problems remain, see above)");
        }
    } else if report.broken() {
        line.push_str("; run `pycstore verify --repair` to fix");
    }
    line.push_str(&format!(" in {:.2}s", report.elapsed_seconds));
    if s.orphans > 0 {
        if let Some(aside) = report.set_aside_indexes.first() {
            line.push_str(&format!(
                "\norphaned objects are kept while the index set aside at `{}` exists (it may \
                 name them); remove it when you no longer need it",
                aside.display()
            ));
        }
    }
    line
}
