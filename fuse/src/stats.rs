//! What a mount counts while it serves, for its final report: pycs served,
//! compiled and stored, and the kernel's requests by operation.

use std::sync::atomic::{AtomicU64, Ordering};

/// The kernel's requests a view counts, one counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Open,
    Read,
    Opendir,
    Readdir,
    Releasedir,
    Readlink,
    Ioctl,
    Forget,
    Create,
    /// Every other request (writes, renames, releases of files, ...).
    Other,
}

impl Op {
    /// Every operation, in the order of [`MountStats::ops`].
    pub(crate) const ALL: [Op; 12] = [
        Op::Lookup,
        Op::Getattr,
        Op::Open,
        Op::Read,
        Op::Opendir,
        Op::Readdir,
        Op::Releasedir,
        Op::Readlink,
        Op::Ioctl,
        Op::Forget,
        Op::Create,
        Op::Other,
    ];

    /// Its name in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Open => "open",
            Op::Read => "read",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Releasedir => "releasedir",
            Op::Readlink => "readlink",
            Op::Ioctl => "ioctl",
            Op::Forget => "forget",
            Op::Create => "create",
            Op::Other => "other",
        }
    }
}

/// Counters of one mount, for its final report.
#[derive(Default, Debug)]
pub(crate) struct MountStats {
    /// pycs served from objects already in the store.
    pub hits: AtomicU64,
    /// Compiles run for misses.
    pub compiled: AtomicU64,
    /// Misses filled from a remote.
    pub fetched: AtomicU64,
    /// Time spent in those compiles, in microseconds (first-access cost).
    pub compile_us: AtomicU64,
    /// Sources that do not compile, or workers that failed.
    pub failed: AtomicU64,
    /// pycs written by Python into the pycache-prefix view and stored.
    pub ingested: AtomicU64,
    /// pycs written by Python that were refused.
    pub refused: AtomicU64,
    /// Requests from the kernel, indexed by `Op as usize`.
    ops: [AtomicU64; Op::ALL.len()],
}

impl MountStats {
    /// Counts one request of `op`.
    pub(crate) fn op(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each operation's name with its count, in [`Op::ALL`] order.
    pub(crate) fn ops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Op::ALL
            .iter()
            .map(|&op| (op.name(), self.ops[op as usize].load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL` lists every operation once, at the index it counts at.
    #[test]
    fn every_op_counts_in_its_own_slot() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?}");
        }
        let stats = MountStats::default();
        stats.op(Op::Read);
        stats.op(Op::Read);
        stats.op(Op::Other);
        let counted: Vec<_> = stats.ops().filter(|(_, n)| *n > 0).collect();
        assert_eq!(counted, [("read", 2), ("other", 1)]);
    }
}
