//! Settings users keep between runs: the config file, the environment, and
//! how they combine with flags.
//!
//! The file is `$XDG_CONFIG_HOME/pycstore/config.toml` (else
//! `~/.config/pycstore/config.toml`), or whatever `PYCSTORE_CONFIG` names.
//! Its keys are the long flags they stand for:
//!
//! ```toml
//! store = "~/.cache/pycstore"
//! link-mode = "hardlink"
//! jobs = 4
//! invalidation-mode = "checked-hash"
//! exclude = ["tests", "pkg/_vendor/**"]
//! remote = ["s3://bucket/pycs"]
//! ```
//!
//! Each setting comes from the first of: the flag, its environment variable,
//! the file, the default. [`parse`] applies the environment and the file to
//! the parsed command line (only where no flag was given), and keeps where
//! each setting came from for `pycstore config`. A malformed file, an
//! unknown key or a value of the wrong type is an error naming the file, the
//! line and the key; a missing default file is no file, but a file named by
//! `PYCSTORE_CONFIG` must exist and be readable.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches, ValueEnum};

use crate::args::{Cli, Command, InvalidationMode, LinkModeArg, RemoteArgs};
use crate::env;

// The remote tier's variables, as its flags read them.
const PYCSTORE_REMOTE: &str = "PYCSTORE_REMOTE";
const PYCSTORE_REMOTE_READ_ONLY: &str = "PYCSTORE_REMOTE_READ_ONLY";
const PYCSTORE_REMOTE_NAMESPACE: &str = "PYCSTORE_REMOTE_NAMESPACE";
const PYCSTORE_REMOTE_TIMEOUT: &str = "PYCSTORE_REMOTE_TIMEOUT";
const PYCSTORE_REMOTE_SIGNING_KEY: &str = "PYCSTORE_REMOTE_SIGNING_KEY";
const PYCSTORE_REMOTE_TRUSTED_KEYS: &str = "PYCSTORE_REMOTE_TRUSTED_KEYS";
const PYCSTORE_REMOTE_JOBS: &str = "PYCSTORE_REMOTE_JOBS";

/// Every key the file may hold, in the order `pycstore config` prints them.
pub const KEYS: [&str; 12] = [
    "store",
    "link-mode",
    "jobs",
    "invalidation-mode",
    "exclude",
    "remote",
    "remote-read-only",
    "remote-namespace",
    "remote-timeout",
    "remote-signing-key",
    "remote-trusted-keys",
    "remote-jobs",
];

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A command-line flag (`--link-mode`).
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// The config file, at this line.
    File(PathBuf, usize),
    /// Built in.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Env(var) => write!(f, "environment {var}"),
            Source::File(path, line) => write!(f, "file {}:{line}", path.display()),
            Source::Default => write!(f, "default"),
        }
    }
}

impl Source {
    fn kind(&self) -> &'static str {
        match self {
            Source::Flag(_) => "flag",
            Source::Env(_) => "env",
            Source::File(..) => "file",
            Source::Default => "default",
        }
    }
}

/// A setting's value (as `pycstore config` shows it, TOML) and its source.
#[derive(Clone, Debug)]
pub struct Shown {
    pub key: &'static str,
    pub value: toml_like::Value,
    pub source: Source,
}

/// What `pycstore config` prints: the file consulted and every setting.
#[derive(Debug)]
pub struct Report {
    pub file: PathBuf,
    pub file_found: bool,
    pub file_from_env: bool,
    pub settings: Vec<Shown>,
}

static REPORT: OnceLock<Report> = OnceLock::new();

/// The settings resolved for this run (set by [`parse`]).
pub fn report() -> Option<&'static Report> {
    REPORT.get()
}

/// Parses the command line (exiting on bad flags, as clap does), then fills
/// in what no flag gave from the environment and the config file.
pub fn parse() -> anyhow::Result<Cli> {
    unset_empty_clap_variables();
    let mut cmd = crate::args::command();
    let matches = cmd.get_matches_mut();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    crate::args::check(&cli, &mut cmd);
    cli.global = cli.global.with_env();
    if matches!(cli.command, Command::Completions(_) | Command::Man(_)) {
        return Ok(cli);
    }
    let file = ConfigFile::load()?;
    let report = apply(&mut cli, &matches, &file)?;
    let _ = REPORT.set(report);
    Ok(cli)
}

/// The variables clap reads for its flags (`#[arg(env = ...)]`).
const CLAP_VARIABLES: [&str; 7] = [
    env::PYCSTORE_REMOTE_READ_ONLY,
    env::PYCSTORE_REMOTE_TIMEOUT,
    env::PYCSTORE_REMOTE_NAMESPACE,
    env::PYCSTORE_REMOTE_SIGNING_KEY,
    env::PYCSTORE_REMOTE_TRUSTED_KEYS,
    env::PYCSTORE_REMOTE_JOBS,
    env::PYCSTORE_COMPILE_TIMEOUT,
];

/// An empty (or blank) variable counts as unset, as it does for every
/// variable pycstore reads itself: a CI template that sets
/// `PYCSTORE_REMOTE_READ_ONLY: ${{ cond && '1' || '' }}` means "not set",
/// not a bad value. clap would take "" as the flag's value, so such a
/// variable is removed before it parses (the process has one thread here).
fn unset_empty_clap_variables() {
    for var in CLAP_VARIABLES {
        if std::env::var_os(var).is_some_and(|v| v.to_string_lossy().trim().is_empty()) {
            std::env::remove_var(var);
        }
    }
}

/// Resolves every setting for `cli` and writes the winners into it.
fn apply(cli: &mut Cli, matches: &ArgMatches, file: &ConfigFile) -> anyhow::Result<Report> {
    let sub = matches.subcommand().map(|(_, m)| m);
    let mut settings = Vec::new();

    // store: clap reads --store; PYCSTORE_DIR is read here, so that it
    // neither shows in a usage line as if typed nor is an error when empty
    // (it then counts as unset).
    let store = match matches.value_source("store") {
        Some(ValueSource::CommandLine) => {
            Setting::new(cli.global.store.clone(), Source::Flag("--store"))
        }
        _ => match std::env::var_os(env::PYCSTORE_DIR).filter(|v| !v.is_empty()) {
            Some(dir) => Setting::new(Some(PathBuf::from(dir)), Source::Env(env::PYCSTORE_DIR)),
            None => match file.path_value("store")? {
                Some((path, line)) => Setting::new(Some(path), file.source(line)),
                None => Setting::new(None, Source::Default),
            },
        },
    };
    cli.global.store = store.value.clone();
    cli.global.store_from = match &store.source {
        Source::Default => None,
        source => Some(source.to_string()),
    };
    let shown_store = store
        .value
        .clone()
        .or_else(pycstore_store::layout::default_root)
        .map(|p| toml_like::Value::Str(p.display().to_string()))
        .unwrap_or(toml_like::Value::Str(String::new()));
    settings.push(Shown {
        key: "store",
        value: shown_store,
        source: store.source,
    });

    let link_mode = resolve_enum::<LinkModeArg>(
        sub,
        "link_mode",
        "--link-mode",
        env::PYCSTORE_LINK_MODE,
        file,
        "link-mode",
    )?;
    let jobs = resolve_jobs(sub, file)?;
    let invalidation = resolve_enum::<InvalidationMode>(
        sub,
        "invalidation_mode",
        "--invalidation-mode",
        env::PYCSTORE_INVALIDATION_MODE,
        file,
        "invalidation-mode",
    )?;
    let exclude = resolve_exclude(sub, file)?;

    match &mut cli.command {
        Command::Link(args) => {
            if let Some(v) = link_mode.value {
                args.link_mode = v;
            }
            if let Some(v) = invalidation.value {
                args.invalidation_mode = v;
            }
            if jobs.value.is_some() {
                args.jobs = jobs.value;
            }
            if let Some(v) = &exclude.value {
                args.exclude = v.clone();
            }
        }
        Command::Status(args) => {
            if let Some(v) = invalidation.value {
                args.invalidation_mode = v;
            }
            if let Some(v) = &exclude.value {
                args.exclude = v.clone();
            }
        }
        Command::Mount(args) => {
            if let Some(v) = invalidation.value {
                args.invalidation_mode = v;
            }
            if jobs.value.is_some() {
                args.jobs = jobs.value;
            }
        }
        _ => {}
    }

    settings.push(Shown {
        key: "link-mode",
        value: toml_like::Value::Str(name_of(link_mode.value.unwrap_or(LinkModeArg::Auto))),
        source: link_mode.source,
    });
    settings.push(Shown {
        key: "jobs",
        value: toml_like::Value::Int(jobs.value.unwrap_or_else(default_jobs) as i64),
        source: jobs.source,
    });
    settings.push(Shown {
        key: "invalidation-mode",
        value: toml_like::Value::Str(name_of(
            invalidation.value.unwrap_or(InvalidationMode::CheckedHash),
        )),
        source: invalidation.source,
    });
    settings.push(Shown {
        key: "exclude",
        value: toml_like::Value::List(exclude.value.unwrap_or_default()),
        source: exclude.source,
    });

    // The remote tier's settings: checked and shown here, read by the
    // remote flags where those exist.
    let remote = resolve_list_env(file, "remote", PYCSTORE_REMOTE)?;
    // Flags, then the environment (read by the remote flags themselves),
    // then the file: the file's remotes and read-only mode reach the
    // commands that take remotes when neither of the others says.
    if let Some(args) = remote_args(&mut cli.command) {
        if let (Some(list), Source::File(..)) = (&remote.value, &remote.source) {
            if args.remote.is_empty() {
                args.remote = list.clone();
            }
        }
        if env_value(PYCSTORE_REMOTE_READ_ONLY).is_none() {
            if let Some((toml_like::Value::Bool(true), _)) = file.scalar("remote-read-only")? {
                args.remote_read_only = true;
            }
        }
        // The other remote settings: the file's, where clap took neither a
        // flag nor a variable (it read those itself).
        let by_flag_or_env = |id: &str| {
            sub.filter(|m| m.try_contains_id(id).unwrap_or(false))
                .and_then(|m| m.value_source(id))
                .is_some_and(|s| matches!(s, ValueSource::CommandLine | ValueSource::EnvVariable))
        };
        if !by_flag_or_env("remote_timeout") {
            if let Some((toml_like::Value::Float(secs), _)) = file.scalar("remote-timeout")? {
                args.remote_timeout = secs;
            }
        }
        if !by_flag_or_env("remote_namespace") {
            if let Some((toml_like::Value::Str(name), _)) = file.scalar("remote-namespace")? {
                args.remote_namespace = name;
            }
        }
        if !by_flag_or_env("remote_signing_key") {
            if let Some((toml_like::Value::Str(path), line)) = file.scalar("remote-signing-key")? {
                args.remote_signing_key = Some(match path.strip_prefix("~/") {
                    Some(rest) => std::env::var_os("HOME")
                        .filter(|h| !h.is_empty())
                        .map(|home| Path::new(&home).join(rest))
                        .ok_or_else(|| {
                            file.error(
                                line,
                                "remote-signing-key",
                                "starts with ~/ but HOME is not set",
                            )
                        })?,
                    None => PathBuf::from(path),
                });
            }
        }
        if !by_flag_or_env("remote_trusted_keys") {
            if let Some((toml_like::Value::List(keys), _)) = file.scalar("remote-trusted-keys")? {
                // Files of keys may start with ~/, as the file's paths do.
                let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
                let keys: Vec<String> = keys
                    .into_iter()
                    .map(|k| match (k.strip_prefix("~/"), &home) {
                        (Some(rest), Some(home)) => {
                            Path::new(home).join(rest).display().to_string()
                        }
                        _ => k,
                    })
                    .collect();
                args.remote_trusted_keys = Some(keys.join(" "));
            }
        }
        if !by_flag_or_env("remote_jobs") {
            if let Some((toml_like::Value::Int(n), _)) = file.scalar("remote-jobs")? {
                args.remote_jobs = usize::try_from(n).unwrap_or(usize::MAX);
            }
        }
    }
    settings.push(Shown {
        key: "remote",
        value: toml_like::Value::List(remote.value.unwrap_or_default()),
        source: remote.source,
    });
    for (key, var, default) in [
        (
            "remote-read-only",
            PYCSTORE_REMOTE_READ_ONLY,
            toml_like::Value::Bool(false),
        ),
        (
            "remote-namespace",
            PYCSTORE_REMOTE_NAMESPACE,
            toml_like::Value::Str("default".into()),
        ),
        (
            "remote-timeout",
            PYCSTORE_REMOTE_TIMEOUT,
            toml_like::Value::Float(10.0),
        ),
        (
            "remote-signing-key",
            PYCSTORE_REMOTE_SIGNING_KEY,
            toml_like::Value::Unset,
        ),
        (
            "remote-trusted-keys",
            PYCSTORE_REMOTE_TRUSTED_KEYS,
            toml_like::Value::Unset,
        ),
        (
            "remote-jobs",
            PYCSTORE_REMOTE_JOBS,
            toml_like::Value::Int(128),
        ),
    ] {
        let shown = if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            Shown {
                key,
                value: toml_like::Value::Str(v.to_string_lossy().into_owned()),
                source: Source::Env(var),
            }
        } else if let Some((value, line)) = file.scalar(key)? {
            Shown {
                key,
                value,
                source: file.source(line),
            }
        } else {
            Shown {
                key,
                value: default,
                source: Source::Default,
            }
        };
        settings.push(shown);
    }

    Ok(Report {
        file: file.path.clone(),
        file_found: file.text.is_some(),
        file_from_env: file.from_env,
        settings,
    })
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn name_of<T: ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

struct Setting<T> {
    value: T,
    source: Source,
}

impl<T> Setting<T> {
    fn new(value: T, source: Source) -> Setting<T> {
        Setting { value, source }
    }
}

/// Whether the subcommand's flag `id` was given on the command line.
fn flag_given(sub: Option<&ArgMatches>, id: &str) -> bool {
    match sub {
        Some(m) if m.try_contains_id(id).unwrap_or(false) => {
            m.value_source(id) == Some(ValueSource::CommandLine)
        }
        _ => false,
    }
}

fn env_value(var: &'static str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

fn parse_enum<T: ValueEnum>(text: &str) -> Result<T, String> {
    T::from_str(text.trim(), false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .map(|v| name_of(v.clone()))
            .collect();
        format!("`{text}` is not one of {}", names.join(", "))
    })
}

/// A flag that is an enum: `Some` when the environment or the file decides
/// it, `None` when the flag or the default does.
fn resolve_enum<T: ValueEnum + Send + Sync + 'static>(
    sub: Option<&ArgMatches>,
    id: &str,
    flag: &'static str,
    var: &'static str,
    file: &ConfigFile,
    key: &'static str,
) -> anyhow::Result<Setting<Option<T>>> {
    if flag_given(sub, id) {
        let value = sub.and_then(|m| m.get_one::<T>(id)).cloned();
        return Ok(Setting::new(value, Source::Flag(flag)));
    }
    if let Some(text) = env_value(var) {
        let value = parse_enum::<T>(&text).map_err(|e| anyhow!("{var}: {e}"))?;
        return Ok(Setting::new(Some(value), Source::Env(var)));
    }
    if let Some((text, line)) = file.string(key)? {
        let value = parse_enum::<T>(&text).map_err(|e| file.error(line, key, &e))?;
        return Ok(Setting::new(Some(value), file.source(line)));
    }
    Ok(Setting::new(None, Source::Default))
}

fn resolve_jobs(
    sub: Option<&ArgMatches>,
    file: &ConfigFile,
) -> anyhow::Result<Setting<Option<usize>>> {
    if flag_given(sub, "jobs") {
        let value = sub.and_then(|m| m.get_one::<usize>("jobs")).copied();
        return Ok(Setting::new(value, Source::Flag("--jobs")));
    }
    let var = env::PYCSTORE_JOBS;
    if let Some(text) = env_value(var) {
        let n: usize = text
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow!("{var}: `{text}` is not a positive integer"))?;
        return Ok(Setting::new(Some(n), Source::Env(var)));
    }
    if let Some((n, line)) = file.integer("jobs")? {
        let n = usize::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
            file.error(
                line,
                "jobs",
                &format!("must be a positive integer, not {n}"),
            )
        })?;
        return Ok(Setting::new(Some(n), file.source(line)));
    }
    Ok(Setting::new(None, Source::Default))
}

fn resolve_exclude(
    sub: Option<&ArgMatches>,
    file: &ConfigFile,
) -> anyhow::Result<Setting<Option<Vec<String>>>> {
    if flag_given(sub, "exclude") {
        let value = sub
            .and_then(|m| m.get_many::<String>("exclude"))
            .map(|v| v.cloned().collect());
        return Ok(Setting::new(value, Source::Flag("--exclude")));
    }
    resolve_list_env(file, "exclude", env::PYCSTORE_EXCLUDE)
}

/// The remote flags of the commands that take them.
fn remote_args(command: &mut Command) -> Option<&mut RemoteArgs> {
    match command {
        Command::Link(args) => Some(&mut args.remote),
        Command::Push(args) => Some(&mut args.remote),
        Command::Status(args) => Some(&mut args.remote),
        Command::Mount(args) => Some(&mut args.remote),
        _ => None,
    }
}

/// A list from a whitespace-separated variable, else the file.
fn resolve_list_env(
    file: &ConfigFile,
    key: &'static str,
    var: &'static str,
) -> anyhow::Result<Setting<Option<Vec<String>>>> {
    if let Some(text) = env_value(var) {
        let list = text.split_whitespace().map(str::to_owned).collect();
        return Ok(Setting::new(Some(list), Source::Env(var)));
    }
    if let Some((list, line)) = file.string_list(key)? {
        return Ok(Setting::new(Some(list), file.source(line)));
    }
    Ok(Setting::new(None, Source::Default))
}

/// The config file: its path, and its text when there is one.
pub struct ConfigFile {
    path: PathBuf,
    from_env: bool,
    text: Option<String>,
}

impl ConfigFile {
    /// Reads the file `PYCSTORE_CONFIG` names (which must be there), else
    /// the default one (which need not), and checks every key.
    pub fn load() -> anyhow::Result<ConfigFile> {
        let (path, from_env) =
            match std::env::var_os(env::PYCSTORE_CONFIG).filter(|v| !v.is_empty()) {
                Some(path) => (PathBuf::from(path), true),
                None => match default_path() {
                    Some(path) => (path, false),
                    None => {
                        return Ok(ConfigFile {
                            path: PathBuf::new(),
                            from_env: false,
                            text: None,
                        });
                    }
                },
            };
        let text = match std::fs::read(&path) {
            Ok(bytes) => Some(
                String::from_utf8(bytes)
                    .map_err(|_| anyhow!("config file `{}`: not UTF-8 text", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from_env => None,
            // The default file behind a directory the caller cannot search
            // (root's 0700 home, for a command run as another user with
            // HOME unchanged) is not theirs: no file. One that exists and
            // cannot be read is still an error.
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied
                    && !from_env
                    && std::fs::symlink_metadata(&path).is_err() =>
            {
                None
            }
            Err(e) => {
                let named = if from_env {
                    format!(" (named by {})", env::PYCSTORE_CONFIG)
                } else {
                    String::new()
                };
                return Err(e).with_context(|| {
                    format!("cannot read the config file `{}`{named}", path.display())
                });
            }
        };
        let file = ConfigFile {
            path,
            from_env,
            text,
        };
        file.check()?;
        Ok(file)
    }

    #[cfg(test)]
    fn from_text(path: &str, text: &str) -> anyhow::Result<ConfigFile> {
        let file = ConfigFile {
            path: path.into(),
            from_env: true,
            text: Some(text.to_owned()),
        };
        file.check()?;
        Ok(file)
    }

    fn table(&self) -> anyhow::Result<Option<toml::Spanned<toml::de::DeTable<'_>>>> {
        let Some(text) = &self.text else {
            return Ok(None);
        };
        match toml::de::DeTable::parse(text) {
            Ok(table) => Ok(Some(table)),
            Err(e) => {
                let line = e.span().map_or(1, |s| self.line(s));
                bail!(
                    "{}:{line}: not valid TOML: {}",
                    self.path.display(),
                    e.message().trim_end()
                )
            }
        }
    }

    /// Parses the file and refuses keys it does not know.
    fn check(&self) -> anyhow::Result<()> {
        let Some(table) = self.table()? else {
            return Ok(());
        };
        for (key, _) in table.get_ref().iter() {
            let name: &str = key.get_ref();
            if !KEYS.contains(&name) {
                let line = self.line(key.span());
                let hint = match KEYS
                    .iter()
                    .find(|k| k.replace('-', "_") == name.replace('-', "_"))
                {
                    Some(k) => format!(" (did you mean `{k}`?)"),
                    None => String::new(),
                };
                bail!(
                    "{}:{line}: unknown key `{name}`{hint}; known keys: {}",
                    self.path.display(),
                    KEYS.join(", ")
                );
            }
        }
        Ok(())
    }

    fn line(&self, span: Range<usize>) -> usize {
        let text = self.text.as_deref().unwrap_or_default();
        let end = span.start.min(text.len());
        text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn source(&self, line: usize) -> Source {
        Source::File(self.path.clone(), line)
    }

    fn error(&self, line: usize, key: &str, message: &str) -> anyhow::Error {
        anyhow!("{}:{line}: `{key}` {message}", self.path.display())
    }

    /// The value of `key` and its line, when the file sets it.
    fn get<R>(
        &self,
        key: &str,
        want: &str,
        f: impl FnOnce(&toml::de::DeValue<'_>) -> Option<R>,
    ) -> anyhow::Result<Option<(R, usize)>> {
        let Some(table) = self.table()? else {
            return Ok(None);
        };
        let Some(value) = table.get_ref().get(key) else {
            return Ok(None);
        };
        let line = self.line(value.span());
        match f(value.get_ref()) {
            Some(r) => Ok(Some((r, line))),
            None => Err(self.error(
                line,
                key,
                &format!("must be {want}, not {}", value.get_ref().type_str()),
            )),
        }
    }

    fn string(&self, key: &str) -> anyhow::Result<Option<(String, usize)>> {
        self.get(key, "a string", |v| v.as_str().map(str::to_owned))
    }

    fn integer(&self, key: &str) -> anyhow::Result<Option<(i64, usize)>> {
        self.get(key, "an integer", |v| {
            v.as_integer()
                .and_then(|i| i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok())
        })
    }

    fn string_list(&self, key: &str) -> anyhow::Result<Option<(Vec<String>, usize)>> {
        self.get(key, "a list of strings", |v| {
            if let Some(s) = v.as_str() {
                return Some(vec![s.to_owned()]);
            }
            v.as_array()?
                .iter()
                .map(|item| item.get_ref().as_str().map(str::to_owned))
                .collect()
        })
    }

    /// A path: absolute, or `~/…` under the home directory.
    fn path_value(&self, key: &str) -> anyhow::Result<Option<(PathBuf, usize)>> {
        let Some((text, line)) = self.string(key)? else {
            return Ok(None);
        };
        let path = if let Some(rest) = text.strip_prefix("~/") {
            let home = std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .ok_or_else(|| self.error(line, key, "starts with ~/ but HOME is not set"))?;
            Path::new(&home).join(rest)
        } else {
            PathBuf::from(&text)
        };
        if !path.is_absolute() {
            return Err(self.error(
                line,
                key,
                &format!("must be an absolute path or start with ~/, not `{text}`"),
            ));
        }
        Ok(Some((path, line)))
    }

    /// A value shown as it is (the remote settings), checked for its type.
    fn scalar(&self, key: &str) -> anyhow::Result<Option<(toml_like::Value, usize)>> {
        let want = match key {
            "remote-read-only" => "a boolean",
            "remote-timeout" => "a number of seconds",
            "remote-jobs" => "a positive integer",
            "remote-trusted-keys" => "a string or a list of strings",
            _ => "a string",
        };
        self.get(key, want, |v| match key {
            "remote-read-only" => v.as_bool().map(toml_like::Value::Bool),
            "remote-timeout" => v
                .as_float()
                .and_then(|f| f.as_str().parse().ok())
                .or_else(|| v.as_integer().and_then(|i| i.as_str().parse::<f64>().ok()))
                .filter(|f: &f64| *f > 0.0)
                .map(toml_like::Value::Float),
            "remote-jobs" => v
                .as_integer()
                .and_then(|i| i.as_str().parse::<i64>().ok())
                .filter(|&n| n > 0)
                .map(toml_like::Value::Int),
            "remote-trusted-keys" => v
                .as_str()
                .map(|s| vec![s.to_owned()])
                .or_else(|| {
                    v.as_array()?
                        .iter()
                        .map(|item| item.get_ref().as_str().map(str::to_owned))
                        .collect()
                })
                .map(toml_like::Value::List),
            _ => v.as_str().map(|s| toml_like::Value::Str(s.to_owned())),
        })
    }
}

/// `$XDG_CONFIG_HOME/pycstore/config.toml`, else `~/.config/pycstore/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("pycstore").join("config.toml"))
}

/// Values as `pycstore config` prints them: TOML, so the output can be
/// pasted into a config file.
pub mod toml_like {
    use std::fmt;

    #[derive(Clone, Debug, PartialEq)]
    pub enum Value {
        Str(String),
        Int(i64),
        Float(f64),
        Bool(bool),
        List(Vec<String>),
        /// No value (an optional setting left out).
        Unset,
    }

    fn quote(s: &str) -> String {
        serde_json::to_string(s).unwrap_or_default()
    }

    impl fmt::Display for Value {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Value::Str(s) => write!(f, "{}", quote(s)),
                Value::Int(n) => write!(f, "{n}"),
                Value::Float(x) => write!(f, "{x:?}"),
                Value::Bool(b) => write!(f, "{b}"),
                Value::List(items) => {
                    let items: Vec<String> = items.iter().map(|s| quote(s)).collect();
                    write!(f, "[{}]", items.join(", "))
                }
                Value::Unset => Ok(()),
            }
        }
    }

    impl Value {
        /// The value as JSON.
        pub fn to_json(&self) -> serde_json::Value {
            match self {
                Value::Str(s) => s.clone().into(),
                Value::Int(n) => (*n).into(),
                Value::Float(x) => (*x).into(),
                Value::Bool(b) => (*b).into(),
                Value::List(items) => items.clone().into(),
                Value::Unset => serde_json::Value::Null,
            }
        }
    }
}

/// The JSON `pycstore config --json` prints.
pub fn report_json(report: &Report) -> serde_json::Value {
    let settings: serde_json::Map<String, serde_json::Value> = report
        .settings
        .iter()
        .map(|s| {
            let mut entry = serde_json::json!({
                "value": s.value.to_json(),
                "source": s.source.kind(),
            });
            match &s.source {
                Source::Flag(flag) => entry["flag"] = (*flag).into(),
                Source::Env(var) => entry["env"] = (*var).into(),
                Source::File(path, line) => {
                    entry["file"] = path.display().to_string().into();
                    entry["line"] = (*line).into();
                }
                Source::Default => {}
            }
            (s.key.to_owned(), entry)
        })
        .collect();
    serde_json::json!({
        "config_file": {
            "path": report.file.display().to_string(),
            "found": report.file_found,
            "from_env": report.file_from_env,
        },
        "settings": settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = ConfigFile::from_text("/c.toml", "jobs = 2\n\nlink_mode = \"copy\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("/c.toml:3: unknown key `link_mode` (did you mean `link-mode`?)"),
            "{err}"
        );
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let err = ConfigFile::from_text("/c.toml", "jobs = 2\nstore = \n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("/c.toml:2: not valid TOML"), "{err}");
    }

    #[test]
    fn typed_values() {
        let file = ConfigFile::from_text(
            "/c.toml",
            "jobs = 3\nexclude = [\"a\", \"b/**\"]\nstore = \"/s\"\nlink-mode = \"copy\"\n",
        )
        .unwrap();
        assert_eq!(file.integer("jobs").unwrap(), Some((3, 1)));
        assert_eq!(
            file.string_list("exclude").unwrap(),
            Some((vec!["a".to_owned(), "b/**".to_owned()], 2))
        );
        assert_eq!(
            file.path_value("store").unwrap(),
            Some((PathBuf::from("/s"), 3))
        );
        let err = file.integer("link-mode").unwrap_err().to_string();
        assert_eq!(err, "/c.toml:4: `link-mode` must be an integer, not string");
        let err = ConfigFile::from_text("/c.toml", "store = \"rel/dir\"\n")
            .unwrap()
            .path_value("store")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be an absolute path"), "{err}");
    }
}
