//! Compiling: the misses of the walk, each key compiled once by the compile
//! threads (one worker process per interpreter and thread, started on the
//! first miss), its object written and its pycs placed.
//!
//! The keys in flight, with every target waiting for them, and the bodies
//! this run compiled are one state behind one lock: a miss either joins
//! the targets of its key in flight, takes the body compiled for it, or
//! becomes a compile job, in one step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::compile::{Outcome, WorkerSlot};
use crate::error::{Cause, FileError, Op};
use crate::index::{Entry, EntrySlot};
use crate::key::CompileKey;
use crate::util::lock;

use super::lookup::Target;
use super::{Run, Settled};

/// One key to compile (or to take from a remote).
pub(super) struct CompileJob {
    /// The miss that made the job: its object is written for this target
    /// (the others of its key wait in [`InFlight::waiting`]).
    pub(super) target: Target,
    /// What a remote returned for this miss, still to be checked.
    pub(super) fetched: Option<crate::remote::Fetched>,
    /// The bundle this run writes for the miss's directory, if any: given
    /// the miss's entry once it is settled.
    pub(super) bundle: Option<Arc<crate::remote::BundleUpload>>,
}

/// The compiles of a run.
#[derive(Default)]
pub(super) struct Compiles {
    state: Mutex<InFlight>,
}

#[derive(Default)]
struct InFlight {
    /// Misses being compiled (one compile job each, holding its source's
    /// bytes and, from a remote, its pyc), with the targets waiting for
    /// them besides the job's own.
    waiting: HashMap<CompileKey, Vec<Target>>,
    /// Bodies compiled by this run, recorded before their key leaves
    /// `waiting`, so a late miss of the same key uses them.
    compiled: HashMap<CompileKey, (EntrySlot, Entry, Settled)>,
}

/// What a compile job gave every target waiting for its key.
enum Answer {
    /// A body, compiled here or fetched from a remote.
    Body(Body),
    /// The source does not compile: what the interpreter said.
    Rejected(String),
    /// No answer (the source could not be read, the worker failed): not
    /// the source's fault, not remembered.
    Failed(FileError),
}

/// A body, as it came.
enum Body {
    /// From a compile worker.
    Compiled(Vec<u8>),
    /// A whole pyc from a remote, checked.
    Fetched(crate::remote::Accepted),
}

impl Body {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Compiled(body) => body,
            Body::Fetched(fetched) => fetched.body(),
        }
    }
}

impl Run<'_> {
    /// A miss: waits for its key in flight, takes the body this run
    /// compiled for it, or becomes a compile job (returned: the caller
    /// sends it on).
    pub(super) fn miss(&self, target: Target) -> Result<Option<CompileJob>, FileError> {
        let mut state = lock(&self.compiles.state);
        if let Some(waiting) = state.waiting.get_mut(&target.key) {
            waiting.push(target);
            return Ok(None);
        }
        if let Some(&(slot, body, how)) = state.compiled.get(&target.key) {
            drop(state);
            let entry = if self.slot(&target) == slot {
                Some(body)
            } else {
                self.derive(&target, &body)?
            };
            return match entry {
                Some(entry) => self.settle(&target, &entry, None, how).map(|()| None),
                None => Err(FileError::new(
                    &target.source.path,
                    Op::Place,
                    Cause::DamagedObject,
                )),
            };
        }
        state.waiting.insert(target.key, Vec::new());
        Ok(Some(CompileJob {
            target,
            fetched: None,
            bundle: None,
        }))
    }

    /// A compile thread: one worker process per interpreter, started lazily.
    pub(super) fn compile_loop(&self, jobs: crossbeam_channel::Receiver<CompileJob>) {
        let mut slots: Vec<Option<WorkerSlot>> =
            (0..self.interpreters.len()).map(|_| None).collect();
        for mut job in jobs {
            // Remote tier hook: a fetched pyc that checks out is used as if
            // compiled here; anything else is compiled.
            let (fetched, mut record) = self.accept_fetched(&mut job);
            let how = if fetched.is_some() {
                Settled::Fetched
            } else {
                Settled::Compiled
            };
            let answer = match fetched {
                Some(fetched) => Answer::Body(Body::Fetched(fetched)),
                None => {
                    let first = &job.target;
                    let slot = slots[first.interpreter].get_or_insert_with(|| {
                        WorkerSlot::new(
                            self.interpreters[first.interpreter].executable.clone(),
                            self.options.timeout,
                        )
                    });
                    let answer = match first.source.bytes() {
                        Ok(bytes) => match slot.compile(&bytes, &first.source.path, first.optimize)
                        {
                            Outcome::Compiled(body) => Answer::Body(Body::Compiled(body)),
                            Outcome::Rejected(message) => Answer::Rejected(message),
                            Outcome::WorkerFailed(e) => Answer::Failed(FileError::new(
                                &first.source.path,
                                Op::Compile,
                                Cause::Worker(Arc::new(e)),
                            )),
                        },
                        Err(e) => Answer::Failed(e),
                    };
                    self.ledger.tally(first.interpreter, |c| c.compiles += 1);
                    answer
                }
            };
            // The object is written, checked and uploaded by this thread
            // alone: the key stays in flight meanwhile, so a miss of it
            // arriving now waits for the result instead of compiling again.
            let first = &job.target;
            let stored = match &answer {
                Answer::Body(body) => {
                    let slot = self.slot(first);
                    // A fetched body was checked when it was accepted.
                    let stored = match body {
                        Body::Fetched(fetched) => self.store_fetched(first, slot, fetched),
                        Body::Compiled(body) => self.store_pyc(first, slot, body, true, false),
                    };
                    if let (Ok(_), Body::Compiled(body)) = (&stored, body) {
                        record = self.upload(&job, body);
                    }
                    Some(stored.map(|entry| (slot, entry)))
                }
                Answer::Rejected(message) => {
                    self.ledger.rejected(&first.key, message);
                    None
                }
                Answer::Failed(_) => None,
            };
            if !matches!(stored, Some(Ok(_))) {
                record = None;
            }
            // The result is recorded before the key leaves the flight, so a
            // later miss of it finds the body.
            let others = {
                let mut state = lock(&self.compiles.state);
                if let Some(Ok((slot, entry))) = &stored {
                    state.compiled.insert(first.key, (*slot, *entry, how));
                }
                state.waiting.remove(&first.key).unwrap_or_default()
            };
            let bundle = job.bundle.take();
            for target in std::iter::once(job.target).chain(others) {
                let result = match (&answer, &stored) {
                    (Answer::Body(_), Some(Err(e))) => Err(e.clone()),
                    (Answer::Body(body), Some(Ok((slot, entry)))) => {
                        // Timestamp pycs of sources with other stats need their own header.
                        let entry = if self.slot(&target) == *slot {
                            Ok(*entry)
                        } else {
                            self.store_pyc(&target, self.slot(&target), body.bytes(), false, false)
                        };
                        entry.and_then(|entry| self.settle(&target, &entry, None, how))
                    }
                    (Answer::Rejected(message), _) => Err(self.rejected(&target, message)),
                    (Answer::Failed(e), _) => Err(e.clone()),
                    (Answer::Body(_), None) => unreachable!("compiled bodies are stored"),
                };
                if let Err(e) = result {
                    self.fail(&target.source.path, target.interpreter, e);
                }
            }
            if let (Some(bundle), Some(remotes)) = (bundle, &self.options.remotes) {
                remotes.bundle_part(&bundle, record);
            }
            self.remote_warnings();
            if let Some(Err(e)) = self.ledger.flush_due(self.store, &self.interpreters) {
                self.progress
                    .warn(&format!("cannot record progress in the index yet: {e}"));
            }
        }
    }
}
