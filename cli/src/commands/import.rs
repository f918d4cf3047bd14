//! `pycstore import FILE`: add the entries and objects of a pack to the
//! store, after checking every byte of it; a damaged pack adds nothing.

use std::io::{BufReader, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use pycstore_store::pack;

use crate::args::{GlobalArgs, ImportArgs};
use crate::output::human_bytes;

pub fn run(global: &GlobalArgs, args: &ImportArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    let from_stdin = args.file == Path::new("-");
    let report = if from_stdin {
        pack::import(&store, std::io::stdin().lock(), Path::new("<stdin>"))?
    } else {
        if args.file.is_dir() {
            anyhow::bail!(
                "`{}` is a directory, not a pack: pass the file `pycstore export` wrote",
                args.file.display()
            );
        }
        let file = open_pack(&args.file)
            .with_context(|| format!("cannot open the pack `{}`", args.file.display()))?;
        pack::import(&store, BufReader::with_capacity(1 << 20, file), &args.file)?
    };

    let mut stdout = std::io::stdout().lock();
    if args.json {
        crate::output::write_json(&mut stdout, &report)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        stdout,
        "imported {} new entries (of {}), {} new failures (of {}) and {} new objects ({}) \
         from {} ({}) in {:.2}s",
        report.entries_added,
        report.entries,
        report.failures_added,
        report.failures,
        report.objects_added,
        human_bytes(report.object_bytes),
        if from_stdin {
            "stdin".to_string()
        } else {
            format!("`{}`", args.file.display())
        },
        human_bytes(report.pack_bytes),
        report.elapsed_seconds,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Opens the pack at `path` for reading without waiting for a writer: a
/// FIFO that nothing writes to (one left where a cache restores its pack)
/// reads as empty, and is rejected as a truncated pack, instead of holding
/// the job until its timeout. A pipe something writes to
/// (`pycstore import <(...)`) is read as usual: reads block again once
/// open.
fn open_pack(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let flags = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(file)
}
