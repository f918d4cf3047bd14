#!/usr/bin/env bash
# The corpus import workload (tests/corpus/import-workload.py) on a
# read-only prefix served by `pycstore mount`, against the same workload on
# the local disk with pycs and on the read-only prefix without any:
#
#   benches/fuse.sh
#
# Timed with hyperfine, RUNS runs each (default 5, after a warmup), all with
# PYTHONDONTWRITEBYTECODE=1:
#   local disk        a copy of the corpus with pycstore's pycs linked in
#   overlay, warm     a read-only copy (a read-only bind mount over itself)
#                     with `pycstore mount --over` on top, the store holding
#                     every pyc already
#   read-only         the same read-only copy without the mount: no pycs,
#                     and Python can write none
#   overlay, cold     first access through a fresh mount on an empty store:
#                     every pyc compiled by the mount as it is imported
#                     (the mount is remade before each run)
#
# Prints a Markdown report and writes it to benches/results/fuse-DATE.md,
# with hyperfine's JSON in benches/results/fuse-DATE/. Reuses corpus.sh's
# corpus in BENCH_DIR (default ~/.cache/pycstore-bench), building it if
# missing; it is never modified: everything runs on copies in
# BENCH_DIR/fuse. Needs root (bind mounts) and fuse3.
#
# Environment: RUNS, BENCH_DIR, CARGO_TARGET_DIR (default
# ~/.cache/pycstore-target), PYCSTORE (a pycstore binary to measure instead
# of building this checkout), PYTHON (the corpus interpreter, default
# make-corpus.sh's CPython 3.11).
set -euo pipefail

runs=${RUNS:-5}
source "$(dirname "$0")/common.sh"

if [[ $EUID -ne 0 ]]; then
  echo "fuse.sh: needs root for the read-only bind mount" >&2
  exit 1
fi

json=$results/fuse-$date
work=$bench/fuse
mkdir -p "$json" "$work"

pycstore=$(pycstore_binary)
# The same corpus as corpus.sh.
corpus=$(the_corpus)

local_copy=$work/local
ro=$work/read-only
store=$work/store
cold_store=$work/cold-store

cleanup() {
  "$pycstore" unmount "$ro" 2>/dev/null || true
  while mountpoint -q "$ro"; do umount "$ro" || break; done
}
trap cleanup EXIT
cleanup

say "copies"
rm_pycs() { find "$1" -name __pycache__ -type d -prune -exec rm -rf {} +; }
# Directories only: a file's mode is its inode's, shared with every hard link.
writable_dirs() { find "$@" -type d ! -perm -u+w -exec chmod u+w {} + 2>/dev/null || true; }
writable_dirs "$store" "$cold_store"
rm -rf "$local_copy" "$ro" "$store" "$cold_store"
cp -a "$corpus" "$local_copy"
cp -a "$corpus" "$ro"
rm_pycs "$local_copy"
rm_pycs "$ro"
"$pycstore" --store "$store" link -q "$local_copy"
mount --bind "$ro" "$ro"
mount -o remount,ro,bind "$ro"

import() { echo "MPLBACKEND=Agg $(q "$1/bin/python") -W ignore $(q "$workload")"; }
mount_over() { echo "$(q "$pycstore") --store $(q "$1") mount --over $(q "$ro") --daemon >/dev/null"; }
# Modules of the prefix one run compiled from source.
from_source() {
  MPLBACKEND=Agg "$1/bin/python" -v -W ignore "$workload" 2>&1 >/dev/null |
    grep -F "# code object from $1/" | grep -c '\.py$' || true
}
hyperfine_to() {
  local name=$1
  shift
  hyperfine --style basic --export-json "$json/$name.json" "$@"
}

say "read-only prefix, no pycs"
hyperfine_to read-only --runs "$runs" --warmup 1 -n "read-only, no pycs" "$(import "$ro")"
from_source_ro=$(from_source "$ro")

say "overlay, warm store"
sh -c "$(mount_over "$store")"
from_source_overlay=$(from_source "$ro")
hyperfine_to warm --runs "$runs" --warmup 1 \
  -n "local disk, pycstore's pycs" "$(import "$local_copy")" \
  -n "overlay, warm store" "$(import "$ro")"
"$pycstore" unmount "$ro"
sleep 1

say "overlay, cold store (first access compiles)"
remount="$pycstore unmount $(q "$ro") 2>/dev/null; sleep 0.5; find $(q "$cold_store") -type d ! -perm -u+w -exec chmod u+w {} + 2>/dev/null; rm -rf $(q "$cold_store"); $(mount_over "$cold_store")"
hyperfine_to cold --runs "$runs" --prepare "$remount" \
  -n "overlay, empty store" "$(import "$ro")"
"$pycstore" unmount "$ro"
sleep 1
compiled=$("$pycstore" --store "$cold_store" stats --json |
  "$python" -c 'import json, sys; d = json.load(sys.stdin); print(d.get("objects", "?"))')

say "report"
report=$results/fuse-$date.md
mapfile -t machine < <(machine_info "$pycstore" "$corpus" "$work" "$runs")
PYTHONPATH=$repo/benches "$python" - "$json" "${machine[@]}" \
  from_source_ro="$from_source_ro" \
  from_source_overlay="$from_source_overlay" \
  compiled="$compiled" \
  <<'PY' | tee "$report" >&3
"""Turns the hyperfine JSON of fuse.sh into a Markdown report."""
import report

info, results = report.load()


def mean(name):
    return results[name]["mean"]


def cell(name):
    return report.cell(results[name])


local = mean("local disk, pycstore's pycs")
overlay = mean("overlay, warm store")
ro = mean("read-only, no pycs")
cold = mean("overlay, empty store")

print(f"""# The import workload through `pycstore mount`, {info['date']}

- Linux {info['kernel']}, {info['cpu']}, {info['nproc']} CPUs; scratch on {info['fs']}
- corpus: {info['py_files']} .py files, CPython {info['python']}; import-workload.py imports 370 packages, {info['from_source_ro']} modules in all
- {info['pycstore']} ({info['commit']}); hyperfine runs per measurement: {info['runs']}

| | mean ± σ (s) | min (s) |
|---|---|---|
| local disk, pycstore's pycs | {cell("local disk, pycstore's pycs")} |
| read-only prefix, overlay mounted over it, warm store | {cell("overlay, warm store")} |
| read-only prefix, no pycs | {cell("read-only, no pycs")} |
| read-only prefix, overlay on an empty store (first access compiles) | {cell("overlay, empty store")} |

| ratio | | target |
|---|---|---|
| overlay / local disk | {overlay / local:.2f}x | at most 1.25x |
| read-only without pycs / overlay | {ro / overlay:.2f}x | at least 2x |
| first access / warm overlay | {cold / overlay:.2f}x | |

- modules of the prefix compiled from source by one run: {info['from_source_ro']} on the
  read-only prefix, {info['from_source_overlay']} through the overlay (warm store);
- first access: the mount compiled {info['compiled']} pycs into the empty store, costing
  {cold - overlay:.3f} s over a warm run ({(cold - overlay) / max(int(info['compiled']) if info['compiled'].isdigit() else 1, 1) * 1000:.1f} ms per pyc),
  against {ro - overlay:.3f} s that every run pays without pycs.""")
PY
echo "report: $report"
