//! Compile workers: long-lived interpreter processes that turn source bytes
//! into marshalled code objects.
//!
//! A worker runs isolated (`-I -S`) so that neither the user's `PYTHON*`
//! variables nor site customizations can change shared results, and compiles
//! with `dont_inherit=True`. It speaks a small framed protocol on stdin and
//! stdout:
//!
//! ```text
//! worker → "pycstore-worker 1\n"                          (ready handshake)
//! caller → "<optimize> <len(name)> <len(source)>\n" name source
//! worker → "ok <n>\n" marshal.dumps(code)   |   "err <n>\n" "<Type>: <message>"
//! ```
//!
//! A worker that crashes, hangs past the per-file timeout or answers garbage
//! is killed; the file is reported and the next request gets a fresh process.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

const WORKER: &str = r#"
import sys, marshal
def main():
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write(b"pycstore-worker 1\n")
    out.flush()
    while True:
        line = inp.readline()
        if not line:
            return
        optimize, name_len, source_len = map(int, line.split())
        name = inp.read(name_len).decode("utf-8", "surrogateescape")
        source = inp.read(source_len)
        try:
            code = compile(source, name, "exec", dont_inherit=True, optimize=optimize)
            data = marshal.dumps(code)
            status = b"ok"
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            data = ("%s: %s" % (type(e).__name__, e)).encode("utf-8", "replace")
            status = b"err"
        out.write(b"%s %d\n" % (status, len(data)))
        out.write(data)
        out.flush()
main()
"#;

const HANDSHAKE: &str = "pycstore-worker 1";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What compiling one file gave.
#[derive(Debug)]
pub enum Outcome {
    /// `marshal.dumps(code)`: the pyc body.
    Compiled(Vec<u8>),
    /// The source does not compile (syntax error, bad encoding, NUL bytes):
    /// deterministic, worth remembering.
    Rejected(String),
    /// The worker crashed, hung or could not start: not the source's fault,
    /// not remembered.
    WorkerFailed(WorkerError),
}

/// Why a compile worker gave no answer for a file. What the worker wrote
/// to its stderr last, if anything, ends the message.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The interpreter could not be run.
    #[error("failed to start `{}`: {source}", executable.display())]
    Start {
        /// The interpreter.
        executable: PathBuf,
        /// Why it could not be run.
        source: io::Error,
    },
    /// It ran, but never said it was ready.
    #[error("`{}` did not start as a compile worker{}", executable.display(), Stderr(stderr))]
    NoHandshake {
        /// The interpreter.
        executable: PathBuf,
        /// The end of its stderr.
        stderr: String,
    },
    /// It died while compiling (or before taking the whole request).
    #[error(
        "the compile worker died ({status}) while compiling this file{}",
        Stderr(stderr)
    )]
    Died {
        /// How it ended, as its exit status says it.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// Its reply could not be read.
    #[error("the compile worker failed: {source}{}", Stderr(stderr))]
    Garbled {
        /// What was wrong with the reply.
        source: io::Error,
        /// The end of its stderr.
        stderr: String,
    },
    /// It took longer than the per-file timeout.
    #[error(
        "compiling took longer than {}s (set {TIMEOUT_ENV} to change the limit, 0 for none)",
        limit.as_secs()
    )]
    Timeout {
        /// The per-file timeout.
        limit: Duration,
    },
}

/// "; its stderr: TEXT" after a message, or nothing when it said nothing.
struct Stderr<'a>(&'a str);

impl std::fmt::Display for Stderr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "; its stderr: {}", self.0)
        }
    }
}

enum Reply {
    Ok(Vec<u8>),
    Err(String),
}

/// One running worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<io::Result<Reply>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Worker {
    fn spawn(executable: &Path, extra_args: &[OsString]) -> Result<Worker, WorkerError> {
        let mut child = Command::new(executable)
            .args(["-I", "-S", "-W", "ignore"])
            .args(extra_args)
            .args(["-c", WORKER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| WorkerError::Start {
                executable: executable.to_path_buf(),
                source,
            })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr_pipe = child.stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let tail = Arc::clone(&stderr);
        thread::spawn(move || keep_tail(stderr_pipe, &tail));
        let (tx, replies) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let ready = reader.read_line(&mut line);
            if ready.is_err() || line.trim_end() != HANDSHAKE {
                let _ = tx.send(Err(io::Error::other("no ready handshake")));
                return;
            }
            let _ = tx.send(Ok(Reply::Ok(Vec::new())));
            loop {
                let reply = read_reply(&mut reader);
                let failed = reply.is_err();
                if tx.send(reply).is_err() || failed {
                    return;
                }
            }
        });
        let mut worker = Worker {
            child,
            stdin,
            replies,
            stderr,
        };
        match worker.replies.recv_timeout(READY_TIMEOUT) {
            Ok(Ok(_)) => Ok(worker),
            Ok(Err(_)) | Err(_) => {
                let _ = worker.child.kill();
                let _ = worker.child.wait();
                Err(WorkerError::NoHandshake {
                    executable: executable.to_path_buf(),
                    stderr: worker.stderr_tail(),
                })
            }
        }
    }

    fn compile(
        &mut self,
        source: &[u8],
        name: &Path,
        optimize: u8,
        timeout: Option<Duration>,
    ) -> Outcome {
        let name = name.as_os_str().as_encoded_bytes();
        let sent = (|| {
            writeln!(self.stdin, "{optimize} {} {}", name.len(), source.len())?;
            self.stdin.write_all(name)?;
            self.stdin.write_all(source)?;
            self.stdin.flush()
        })();
        if let Err(e) = sent {
            // It died before taking the whole request (EPIPE), or cannot be
            // talked to: either way it is done for.
            tracing::debug!("writing to the compile worker failed: {e}");
            let _ = self.child.kill();
            let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Outcome::WorkerFailed(WorkerError::Died {
                status,
                stderr: self.stderr_tail(),
            });
        }
        let reply = match timeout {
            Some(t) => self.replies.recv_timeout(t),
            None => self
                .replies
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        match reply {
            Ok(Ok(Reply::Ok(body))) => Outcome::Compiled(body),
            Ok(Ok(Reply::Err(message))) => Outcome::Rejected(message),
            Ok(Err(source)) if source.kind() != io::ErrorKind::UnexpectedEof => {
                Outcome::WorkerFailed(WorkerError::Garbled {
                    source,
                    stderr: self.stderr_tail(),
                })
            }
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Outcome::WorkerFailed(WorkerError::Died {
                    status,
                    stderr: self.stderr_tail(),
                })
            }
            Err(RecvTimeoutError::Timeout) => Outcome::WorkerFailed(WorkerError::Timeout {
                limit: timeout.unwrap_or_default(),
            }),
        }
    }

    /// The end of what the worker wrote to its stderr, trimmed.
    fn stderr_tail(&self) -> String {
        // Give the reader thread a moment to collect the last words.
        thread::sleep(Duration::from_millis(20));
        let tail = self.stderr.lock().map(|t| t.clone()).unwrap_or_default();
        String::from_utf8_lossy(&tail).trim().to_owned()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment variable holding the per-file compile timeout in seconds.
pub const TIMEOUT_ENV: &str = "PYCSTORE_COMPILE_TIMEOUT";

/// A compile worker for one interpreter, started on first use and replaced
/// after it fails.
pub struct WorkerSlot {
    executable: PathBuf,
    timeout: Option<Duration>,
    extra_args: Vec<OsString>,
    worker: Option<Worker>,
}

impl WorkerSlot {
    /// A slot for `executable`; `timeout` bounds each file (None: no limit).
    pub fn new(executable: PathBuf, timeout: Option<Duration>) -> Self {
        Self::with_args(executable, timeout, Vec::new())
    }

    /// Like [`WorkerSlot::new`], with more interpreter options before the
    /// worker's code (a FUSE mount starts its workers with `-B -X
    /// pycache_prefix=...`, so that starting one never reads a pyc the mount
    /// itself would have to compile).
    pub fn with_args(
        executable: PathBuf,
        timeout: Option<Duration>,
        extra_args: Vec<OsString>,
    ) -> Self {
        WorkerSlot {
            executable,
            timeout,
            extra_args,
            worker: None,
        }
    }

    /// Compiles `source` as if it were the file `name`.
    pub fn compile(&mut self, source: &[u8], name: &Path, optimize: u8) -> Outcome {
        if self.worker.is_none() {
            match Worker::spawn(&self.executable, &self.extra_args) {
                Ok(w) => self.worker = Some(w),
                Err(e) => return Outcome::WorkerFailed(e),
            }
        }
        let worker = self.worker.as_mut().expect("spawned above");
        let outcome = worker.compile(source, name, optimize, self.timeout);
        if matches!(outcome, Outcome::WorkerFailed(_)) {
            self.worker = None;
        }
        outcome
    }
}

fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the worker exited",
        ));
    }
    let (status, len) = line
        .trim_end()
        .split_once(' ')
        .ok_or_else(|| io::Error::other(format!("garbled reply {line:?}")))?;
    let len: usize = len
        .parse()
        .map_err(|_| io::Error::other(format!("garbled reply {line:?}")))?;
    let mut data = vec![0; len];
    reader.read_exact(&mut data)?;
    match status {
        "ok" => Ok(Reply::Ok(data)),
        "err" => Ok(Reply::Err(String::from_utf8_lossy(&data).into_owned())),
        _ => Err(io::Error::other(format!("garbled reply {line:?}"))),
    }
}

fn keep_tail(mut pipe: impl Read, tail: &Mutex<Vec<u8>>) {
    const KEEP: usize = 4096;
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            return;
        }
        if let Ok(mut t) = tail.lock() {
            t.extend_from_slice(&buf[..n]);
            if t.len() > KEEP {
                let cut = t.len() - KEEP;
                t.drain(..cut);
            }
        }
    }
}
