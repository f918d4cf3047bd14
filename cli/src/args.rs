//! The command line, as clap derive structs. These are raw input: commands
//! resolve them into settings before doing any I/O. Doc comments are the help.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::env;

/// Compile Python bytecode once per machine and link it into every environment.
#[derive(Parser, Debug)]
#[command(name = "pycstore", version = crate::version::text(), about, max_term_width = 100)]
#[command(before_help = "Example: pycstore link .venv", help_template = HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    /// More logging (-v debug, -vv trace); PYCSTORE_LOG takes a filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = GLOBAL)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// Every help page: what the command is for, one example, then the usage.
const HELP: &str =
    "{about-with-newline}\n{before-help}{usage-heading} {usage}\n\n{all-args}{after-help}";

/// The heading of the options every subcommand takes, listed apart from its own.
const GLOBAL: &str = "Global options";

/// Flags every subcommand takes (each is shown in the help of the
/// subcommands it matters to, under "Global options"). Their environment
/// variables are read by [`GlobalArgs::with_env`], not by clap, so that a
/// variable neither shows in a usage line as if it were typed nor makes an
/// empty value an error.
#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// The store directory; PYCSTORE_DIR when not given (empty counts as
    /// unset) [default: $XDG_CACHE_HOME/pycstore, else ~/.cache/pycstore].
    #[arg(long, global = true, value_name = "DIR", help_heading = GLOBAL)]
    pub store: Option<PathBuf>,

    /// When creating the store, share it with this group (mode 2770) instead
    /// of keeping it private to its owner; PYCSTORE_SHARED_GROUP when not
    /// given. Members of the group can then run code in every environment
    /// linked from it.
    #[arg(long, global = true, value_name = "GROUP", help_heading = GLOBAL)]
    pub shared_group: Option<String>,

    /// Run interpreters (and their standard libraries) that a user other
    /// than you or root can change, which is refused when you are root or
    /// the store is shared: that user could run code as you. What such an
    /// interpreter compiles is kept for it alone. PYCSTORE_TRUST_PYTHON=1
    /// does the same.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub trust_python: bool,

    /// Where the store location came from (`flag --store`, `environment
    /// PYCSTORE_DIR`, the config file), for messages; `None`: the default.
    /// Set by `config::parse`.
    #[arg(skip)]
    pub store_from: Option<String>,
}

impl GlobalArgs {
    /// Fills in what the command line left out from the environment (the
    /// store is `config::parse`'s: the config file may name it too): an
    /// empty variable counts as unset, and PYCSTORE_TRUST_PYTHON is on for
    /// any value but `0`, `false`, `no` and `off`.
    pub fn with_env(mut self) -> GlobalArgs {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if self.shared_group.is_none() {
            self.shared_group =
                var(env::PYCSTORE_SHARED_GROUP).map(|g| g.to_string_lossy().into_owned());
        }
        if !self.trust_python {
            self.trust_python = var(env::PYCSTORE_TRUST_PYTHON).is_some_and(|v| {
                !matches!(
                    v.to_string_lossy().to_ascii_lowercase().as_str(),
                    "0" | "false" | "no" | "off"
                )
            });
        }
        self
    }
}

/// The command line parser. The global options are accepted everywhere but
/// shown only in the help of the subcommands they matter to: `--store`
/// wherever the store is used, `--shared-group` where a store can be
/// created, `--trust-python` where an interpreter runs.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let hidden_in: [(&str, &[&str]); 3] = [
        ("store", &["unmount", "completions", "man"]),
        (
            "shared_group",
            &[
                "unlink",
                "status",
                "stats",
                "gc",
                "verify",
                "export",
                "unmount",
                "config",
                "completions",
                "man",
            ],
        ),
        (
            "trust_python",
            &[
                "unlink",
                "stats",
                "gc",
                "verify",
                "import",
                "unmount",
                "config",
                "completions",
                "man",
            ],
        ),
    ];
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for (id, hidden_in) in hidden_in {
        let global = cmd
            .get_arguments()
            .find(|a| a.get_id() == id)
            .expect("a global option")
            .clone();
        for name in names.iter().filter(|n| hidden_in.contains(&n.as_str())) {
            // A subcommand that has an argument of the global's id does not
            // get the global: this hidden copy takes its place, and its
            // value still reaches the global.
            let hidden = global.clone().global(false).hide(true);
            cmd = cmd.mut_subcommand(name, |sub| sub.arg(hidden));
        }
    }
    cmd
}

/// Checks what clap cannot: a `mount` must name its view. Exits with
/// clap's usage error, and the command line that was probably meant.
pub fn check(cli: &Cli, cmd: &mut clap::Command) {
    if let Command::Mount(mount) = &cli.command {
        if let Some(problem) = mount.view_problem() {
            let sub = cmd
                .find_subcommand_mut("mount")
                .expect("mount is a subcommand");
            sub.error(clap::error::ErrorKind::MissingRequiredArgument, problem)
                .exit();
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Put a valid pyc beside every .py file of each prefix (venv, conda env,
    /// CPython install, or any directory of sources with --python).
    #[command(before_help = "Example: pycstore link .venv", help_template = HELP)]
    Link(LinkArgs),

    /// Remove the pycs pycstore placed in each prefix (and the __pycache__
    /// directories it created, when left empty); nothing else.
    #[command(before_help = "Example: pycstore unlink --dry-run .venv", help_template = HELP)]
    Unlink(UnlinkArgs),

    /// Report, per interpreter, how many sources have a pyc from the store,
    /// a foreign valid pyc, a stale pyc, or none; with --remote, how many of
    /// those without a valid pyc the store lacks and a remote would give
    /// (asked without fetching objects stored apart; nothing is stored).
    #[command(before_help = "Example: pycstore status .venv", help_template = HELP)]
    Status(StatusArgs),

    /// Show what the store holds and how it was used since the last --zero.
    #[command(before_help = "Example: pycstore stats --json", help_template = HELP)]
    Stats(StatsArgs),

    /// Evict least recently used objects (those still linked somewhere
    /// last) until the store fits --max-size, or those unused for --older-than.
    #[command(before_help = "Example: pycstore gc --max-size 2G", help_template = HELP)]
    Gc(GcArgs),

    /// Check every object against its name and the index, both ways.
    #[command(before_help = "Example: pycstore verify --repair", help_template = HELP)]
    Verify(VerifyArgs),

    /// Write store entries to a zstd-compressed pack (for CI caches).
    #[command(before_help = "Example: pycstore export pycs.pack --prefix .venv", help_template = HELP)]
    Export(ExportArgs),

    /// Add the entries of a pack to the store, after checking all of it.
    #[command(before_help = "Example: pycstore import pycs.pack", help_template = HELP)]
    Import(ImportArgs),

    /// Print the effective settings (flags, environment, config file,
    /// defaults) and where each came from.
    #[command(before_help = "Example: pycstore config --json", help_template = HELP)]
    Config(ConfigArgs),

    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    #[command(
        before_help = "Example: pycstore completions bash > ~/.local/share/bash-completion/completions/pycstore",
        help_template = HELP
    )]
    Completions(CompletionsArgs),

    /// Print the man page (roff), or write one per subcommand into --dir.
    #[command(before_help = "Example: pycstore man --dir ~/.local/share/man/man1", help_template = HELP)]
    Man(ManArgs),

    /// Serve the store's pycs through FUSE where pycs cannot be written: a
    /// read-only overlay of a prefix whose __pycache__ directories hold them
    /// (--source PREFIX MOUNTPOINT, or --over PREFIX), or a tree for
    /// PYTHONPYCACHEPREFIX (--pycache-prefix MOUNTPOINT). Misses are asked
    /// of the --remote caches, if any, then compiled, on first access; what
    /// the mount compiles is uploaded unless --remote-read-only. Runs until
    /// unmounted (`pycstore unmount`, SIGTERM).
    #[command(before_help = "Example: pycstore mount --source /opt/env /mnt/env --daemon", help_template = HELP)]
    #[command(
        override_usage = "pycstore mount [OPTIONS] --source <PREFIX> <MOUNTPOINT>\n       \
                                pycstore mount [OPTIONS] --over <PREFIX>\n       \
                                pycstore mount [OPTIONS] --pycache-prefix <MOUNTPOINT>"
    )]
    Mount(MountArgs),

    /// Unmount a view mounted by `pycstore mount`; its server then exits.
    #[command(before_help = "Example: pycstore unmount /mnt/env", help_template = HELP)]
    Unmount(UnmountArgs),

    /// Upload the pycs the store holds (or those linked under PREFIX...) to
    /// the remotes, to prewarm a shared cache from a trusted job.
    Push(PushArgs),

    /// Make an ed25519 key pair for signing remote entries: NAME.secret
    /// (for trusted writers: PYCSTORE_REMOTE_SIGNING_KEY) and NAME.pub (for
    /// readers: PYCSTORE_REMOTE_TRUSTED_KEYS).
    Keygen(KeygenArgs),
}

/// The remote tier: caches shared between machines, behind the local store.
#[derive(Args, Debug, Clone)]
pub struct RemoteArgs {
    /// A remote cache to ask for local misses and give compiled pycs to:
    /// s3://BUCKET[/PREFIX], redis://[USER:PASS@]HOST[:PORT][/DB] (rediss://),
    /// http(s)://HOST[:PORT]/PATH (WebDAV or HTTP GET/PUT), file:///PATH.
    /// Repeatable, asked in the order given [env: PYCSTORE_REMOTE, a
    /// whitespace-separated list].
    #[arg(long = "remote", value_name = "URL")]
    pub remote: Vec<String>,

    /// Never write to a remote (for untrusted jobs such as fork pull requests).
    #[arg(long, env = env::PYCSTORE_REMOTE_READ_ONLY, value_parser = clap::builder::BoolishValueParser::new())]
    pub remote_read_only: bool,

    /// Seconds one remote request may take; a remote that does not answer
    /// in time is left alone for the rest of the run (a mount tries it
    /// again after --remote-retry).
    #[arg(long, env = env::PYCSTORE_REMOTE_TIMEOUT, default_value_t = 10.0, value_name = "SECONDS")]
    pub remote_timeout: f64,

    /// The namespace inside the remotes: projects or Python fleets sharing a
    /// bucket keep apart.
    #[arg(long, env = env::PYCSTORE_REMOTE_NAMESPACE, default_value = "default", value_name = "NAME")]
    pub remote_namespace: String,

    /// Sign every uploaded entry with this ed25519 key (from `pycstore keygen`).
    #[arg(long, env = env::PYCSTORE_REMOTE_SIGNING_KEY, value_name = "FILE")]
    pub remote_signing_key: Option<PathBuf>,

    /// Accept only entries signed by one of these public keys (NAME:BASE64,
    /// or files of them), whitespace-separated.
    #[arg(long, env = env::PYCSTORE_REMOTE_TRUSTED_KEYS, value_name = "KEYS")]
    pub remote_trusted_keys: Option<String>,

    /// Requests to the remotes in flight at once.
    #[arg(long, env = env::PYCSTORE_REMOTE_JOBS, default_value_t = 128, value_name = "N")]
    pub remote_jobs: usize,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Push only the pycs linked under these prefixes [default: all].
    #[arg(value_name = "PREFIX")]
    pub prefixes: Vec<PathBuf>,

    #[command(flatten)]
    pub remote: RemoteArgs,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The key's name, carried by every signature (e.g. ci.example.org-1).
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Where to write NAME.secret and NAME.pub.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("view").args(["source", "over", "pycache_prefix"])))]
pub struct MountArgs {
    /// Overlay view: serve PREFIX read-only at MOUNTPOINT, every directory
    /// of sources with a __pycache__ of pycs from the store.
    #[arg(long, value_name = "PREFIX", requires = "mountpoint")]
    pub source: Option<PathBuf>,

    /// Overlay view mounted over PREFIX itself, so its paths, shebangs and
    /// pyvenv.cfg stay valid; the files underneath are served through a
    /// descriptor opened before mounting.
    #[arg(long, value_name = "PREFIX", conflicts_with = "mountpoint")]
    pub over: Option<PathBuf>,

    /// Pycache-prefix view at MOUNTPOINT, for PYTHONPYCACHEPREFIX=MOUNTPOINT:
    /// MOUNTPOINT/DIR/NAME.TAG.pyc is the pyc of /DIR/NAME.py. pycs Python
    /// writes there are checked against their source and stored.
    #[arg(long, requires = "mountpoint")]
    pub pycache_prefix: bool,

    /// Where to mount (an existing directory; not with --over).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: Option<PathBuf>,

    /// A second directory, taken only to say which view was meant
    /// (`mount venv mnt` is `mount --source venv mnt`).
    #[arg(value_name = "MOUNTPOINT", hide = true)]
    pub stray: Option<PathBuf>,

    /// Interpreter to serve pycs for (repeatable) [default: the prefix's
    /// bin/python3; python3 on PATH for --pycache-prefix].
    #[arg(long, value_name = "PATH")]
    pub python: Vec<PathBuf>,

    /// Optimize levels to serve, comma-separated: 0 (plain), 1 (-O), 2 (-OO).
    #[arg(long, short = 'O', value_delimiter = ',', default_value = "0", value_parser = clap::value_parser!(u8).range(0..=2))]
    pub optimize: Vec<u8>,

    /// How Python decides a served pyc is still valid (timestamp headers
    /// carry the live source's mtime and size).
    #[arg(long, value_enum, default_value_t = InvalidationMode::CheckedHash)]
    pub invalidation_mode: InvalidationMode,

    /// Compile processes per interpreter; 0 means the number of CPUs, as
    /// for compileall -j0 [default: the number of CPUs].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,

    /// Never compile in the mount: a miss has no pyc, Python compiles it
    /// itself (and, in the pycache-prefix view, what it writes is stored).
    #[arg(long)]
    pub no_compile: bool,

    /// Let other users (and root) see the mount. Whoever can read it runs
    /// the store's code; non-root users need user_allow_other in
    /// /etc/fuse.conf.
    #[arg(long)]
    pub allow_other: bool,

    /// Detach once the mount is up; the exit status says whether it is.
    #[arg(long, short = 'd')]
    pub daemon: bool,

    /// Append the server's messages (warnings, the final report) to FILE;
    /// a detached server otherwise discards them.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// Set by --daemon on the detached server it starts: say "ready" on
    /// stdout once mounted, then let go of the terminal.
    #[arg(long, hide = true)]
    pub daemon_child: bool,

    /// How long the kernel may cache names, attributes and listings of the
    /// view: changes to the tree (and pycs of changed sources) show within
    /// this time. Longer suits immutable stacks.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub cache_ttl: u64,

    /// Threads answering the kernel [default: twice the CPUs, at least 4].
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub threads: Option<usize>,

    /// Per-file compile timeout in seconds, 0 for none.
    #[arg(long, env = env::PYCSTORE_COMPILE_TIMEOUT, default_value_t = 120, value_name = "SECONDS")]
    pub compile_timeout: u64,

    // Misses are asked of the remotes on first access before compiling
    // (also with --no-compile), and what the view compiles is uploaded
    // unless read-only; a remote that fails or does not answer in time is
    // said once and left alone until a retry finds it answering.
    #[command(flatten)]
    pub remote: RemoteArgs,

    /// Seconds a remote that failed is left alone before it is asked again
    /// (in the background, on the next access); 0: for as long as the
    /// mount lives.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub remote_retry: u64,
}

impl MountArgs {
    /// What is wrong with the view the command line names, if anything,
    /// with the command line that would do what it seems to mean.
    fn view_problem(&self) -> Option<String> {
        let view_given = self.source.is_some() || self.over.is_some() || self.pycache_prefix;
        let views = "`--source PREFIX MOUNTPOINT` (an overlay of PREFIX at MOUNTPOINT), \
                     `--over PREFIX` (an overlay mounted over PREFIX itself) or \
                     `--pycache-prefix MOUNTPOINT` (a tree for PYTHONPYCACHEPREFIX)";
        match (&self.mountpoint, &self.stray) {
            (Some(prefix), Some(mountpoint)) if !view_given => Some(format!(
                "name the view: to serve `{}` with its pycs at `{}`, run `pycstore mount \
                 --source {} {}`; the views are {views}",
                prefix.display(),
                mountpoint.display(),
                prefix.display(),
                mountpoint.display()
            )),
            (_, Some(stray)) => Some(format!(
                "unexpected argument `{}`: the views are {views}",
                stray.display()
            )),
            _ if !view_given => Some(format!("name the view: {views}")),
            _ => None,
        }
    }
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// The mount point (for --over, the prefix).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// Detach the mount even while processes use it; it goes away when the
    /// last one leaves.
    #[arg(long, short = 'l')]
    pub lazy: bool,
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

    // The remotes are asked which of the pycs the store lacks they would
    // give (one request per such pyc, checked as link checks, without
    // fetching objects stored apart); nothing is stored or uploaded.
    #[command(flatten)]
    pub remote: RemoteArgs,

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
    /// Evict least recently used objects until the objects take at most this
    /// much disk: a number of bytes with an optional unit, K/M/G/T (powers
    /// of 1000) or KiB/MiB/GiB/TiB (powers of 1024), e.g. 500M, 2G, 1.5GiB.
    /// Objects still linked into a prefix go last.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,

    /// Evict objects unused for longer than this: a number and a unit, s, m,
    /// h, d or w, e.g. 30d, 12h, 90m, 45s. Objects still linked into a
    /// prefix are kept (evicting them would free nothing).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<Duration>,

    /// Report what would be evicted, evict nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Drop what is broken (damaged objects and the entries naming them,
    /// entries naming missing objects, orphaned objects), fix permissions,
    /// repair or rebuild a damaged index; the next link compiles again what
    /// was dropped. Waits for other pycstore processes to finish.
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

    /// Compile processes per interpreter; 0 means the number of CPUs, as
    /// for compileall -j0 [default: the number of CPUs].
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

    /// The largest source to read (e.g. 64M); larger `.py` files are
    /// reported and skipped.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub max_source_size: u64,

    #[command(flatten)]
    pub remote: RemoteArgs,
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

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Print the settings as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write pycstore.1 and a pycstore-SUBCOMMAND.1 per subcommand into DIR
    /// instead of printing pycstore.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Parses a size: a number with an optional unit, `B`, `K`/`KB`, `M`/`MB`,
/// `G`/`GB`, `T`/`TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB`
/// (powers of 1024), in any case: `500M`, `2G`, `1.5GiB`, `1000000`.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!("`{text}` is not a size: give a number of bytes with an optional unit (500M, 2G, 1.5GiB)")
    };
    let number: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    Ok((number * multiplier).round() as u64)
}

/// Parses an age: a number and a unit, `s`, `m`, `h`, `d` or `w`
/// (`30d`, `12h`, `90m`, `45s`, `1.5d`). A bare number is refused: it is
/// too easy to mean days and say seconds.
fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("`{text}` is not an age: give a number and a unit (30d, 12h, 90m, 45s)");
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        "w" | "week" | "weeks" => 7.0 * 86_400.0,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs_f64(number * seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_parse() {
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("500M"), Ok(500_000_000));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("2gb"), Ok(2_000_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(1_610_612_736));
        assert_eq!(parse_size("64 KiB"), Ok(65_536));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_age("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert!(parse_age("30").unwrap_err().contains("30d"));
        assert!(parse_age("3y").is_err());
    }
}
