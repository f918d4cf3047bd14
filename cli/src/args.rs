//! The command line, as clap derive structs. These are raw input: commands
//! resolve them into settings before doing any I/O. Doc comments are the help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::env;

/// Compile Python bytecode once per machine and link it into every environment.
#[derive(Parser, Debug)]
#[command(name = "pycstore", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    /// More logging (-v debug, -vv trace); PYCSTORE_LOG takes a filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes.
#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// The store directory [default: $XDG_CACHE_HOME/pycstore, else ~/.cache/pycstore].
    #[arg(long, global = true, env = env::PYCSTORE_DIR, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// When creating the store, share it with this group (mode 2770) instead
    /// of keeping it private to its owner. Members of the group can then run
    /// code in every environment linked from it.
    #[arg(long, global = true, env = env::PYCSTORE_SHARED_GROUP, value_name = "GROUP")]
    pub shared_group: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Put a valid pyc beside every .py file of each prefix (venv, conda env,
    /// CPython install, or any directory of sources with --python).
    Link(LinkArgs),

    /// Remove the pycs pycstore placed in each prefix (and the __pycache__
    /// directories it created, when left empty); nothing else.
    Unlink(UnlinkArgs),

    /// Report, per interpreter, how many sources have a pyc from the store,
    /// a foreign valid pyc, a stale pyc, or none.
    Status(StatusArgs),

    /// Show what the store holds and how it was used since the last --zero.
    Stats(StatsArgs),

    /// Evict least recently used objects (those still linked somewhere
    /// last) until the store fits --max-size, or those unused for --older-than.
    Gc(GcArgs),

    /// Check every object against its name and the index, both ways.
    Verify(VerifyArgs),

    /// Write store entries to a zstd-compressed pack (for CI caches).
    Export(ExportArgs),

    /// Add the entries of a pack to the store, after checking all of it.
    Import(ImportArgs),
}

#[derive(Args, Debug)]
pub struct UnlinkArgs {
    /// Prefixes to clean.
    #[arg(required = true, value_name = "PREFIX")]
    pub prefixes: Vec<PathBuf>,

    /// Report what would be removed, remove nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Prefixes to report on.
    #[arg(required = true, value_name = "PREFIX")]
    pub prefixes: Vec<PathBuf>,

    /// Interpreter to report for (repeatable) [default: the prefix's bin/python3].
    #[arg(long, value_name = "PATH")]
    pub python: Vec<PathBuf>,

    /// Optimize levels to report on, comma-separated.
    #[arg(long, short = 'O', value_delimiter = ',', default_value = "0", value_parser = clap::value_parser!(u8).range(0..=2))]
    pub optimize: Vec<u8>,

    /// The invalidation mode pycs from the store are expected in.
    #[arg(long, value_enum, default_value_t = InvalidationMode::CheckedHash)]
    pub invalidation_mode: InvalidationMode,

    /// Skip files and directories matching this glob (as for link).
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Print as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// Reset the usage counters (after printing them).
    #[arg(long, short = 'z')]
    pub zero: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Evict until the objects take at most this much disk (e.g. 500M, 2G).
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<String>,

    /// Evict objects unused for longer than this (e.g. 30d, 12h, 90m).
    #[arg(long, value_name = "AGE")]
    pub older_than: Option<String>,

    /// Report what would be evicted, evict nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Drop what is broken (objects, entries, a damaged index) so the next
    /// link recompiles it.
    #[arg(long)]
    pub repair: bool,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The pack to write (`-` for stdout).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Only entries for this interpreter (repeatable).
    #[arg(long, value_name = "PATH")]
    pub python: Vec<PathBuf>,

    /// Only entries linked into this prefix (repeatable).
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Vec<PathBuf>,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The pack to read (`-` for stdin).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LinkArgs {
    /// Prefixes to link: directories holding Python sources.
    #[arg(required = true, value_name = "PREFIX")]
    pub prefixes: Vec<PathBuf>,

    /// Interpreter to compile for (repeatable) [default: the prefix's bin/python3].
    #[arg(long, value_name = "PATH")]
    pub python: Vec<PathBuf>,

    /// Optimize levels to materialize, comma-separated: 0 (plain), 1 (-O), 2 (-OO).
    #[arg(long, short = 'O', value_delimiter = ',', default_value = "0", value_parser = clap::value_parser!(u8).range(0..=2))]
    pub optimize: Vec<u8>,

    /// How Python decides a pyc is still valid.
    #[arg(long, value_enum, default_value_t = InvalidationMode::CheckedHash)]
    pub invalidation_mode: InvalidationMode,

    /// How pycs are put into the prefix: auto tries reflink, then hardlink, then copy.
    #[arg(long, value_enum, default_value_t = LinkModeArg::Auto)]
    pub link_mode: LinkModeArg,

    /// Compile processes [default: the number of CPUs].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,

    /// Skip files and directories matching this glob (repeatable). Without a
    /// `/` it matches any file or directory name (`tests`); with one, the path
    /// relative to the prefix (`pkg/vendored/**`).
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,

    /// Report what would be done, write nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// No progress bar and no summary; failures are still reported.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Per-file compile timeout in seconds, 0 for none.
    #[arg(long, env = env::PYCSTORE_COMPILE_TIMEOUT, default_value_t = 120, value_name = "SECONDS")]
    pub compile_timeout: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum InvalidationMode {
    /// The source's hash in the header, checked at import: safe to share (default).
    CheckedHash,
    /// The source's hash, never checked: fastest import, for immutable prefixes.
    UncheckedHash,
    /// The source's mtime and size: what most installers write.
    Timestamp,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LinkModeArg {
    /// Reflink where possible, else hardlink, else copy (decided per filesystem).
    Auto,
    /// Copy-on-write clones (XFS, btrfs).
    Reflink,
    /// Hard links to the store's read-only objects.
    Hardlink,
    /// Plain copies.
    Copy,
}
