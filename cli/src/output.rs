//! Progress bars and summaries for humans; JSON for machines.

use std::io::Write;
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pycstore_store::link::Progress;

/// A progress bar on stderr when it is a terminal, else nothing.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(enabled: bool) -> Bar {
        let bar = if enabled {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} pycs ({per_sec})",
            )
            .expect("valid template"),
        );
        Bar { bar }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.bar.set_length(total);
    }

    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    fn warn(&self, message: &str) {
        self.bar
            .suspend(|| eprintln!("pycstore: warning: {message}"));
    }
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `n` and the noun for it: "1 object", "2 objects".
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// How many per-file problems a human summary lists before counting the rest.
pub const SHOW_PROBLEMS: usize = 50;

/// Prints one line per problem on stderr, naming its path, at most `limit`
/// of them and then how many more there are (`--json` lists them all).
pub fn print_problems<'a>(
    problems: impl ExactSizeIterator<Item = (&'a Path, &'a str)>,
    limit: usize,
    noun: &str,
) -> std::io::Result<()> {
    let total = problems.len();
    let mut stderr = std::io::stderr().lock();
    for (path, message) in problems.take(limit) {
        writeln!(stderr, "pycstore: {}: {message}", path.display())?;
    }
    if total > limit {
        writeln!(
            stderr,
            "pycstore: ... and {} more {noun} (--json lists all)",
            total - limit
        )?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON and a newline: the `--json` output of every
/// command.
pub fn write_json(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}
