# What benches/corpus.sh and benches/fuse.sh share; sourced, not run.
#
# Sets repo, corpus_dir, bench, python, requirements, workload, date, results,
# commit;
# exports CARGO_TARGET_DIR and PYTHONDONTWRITEBYTECODE=1; sends stdout to
# stderr, keeping the report's stdout as descriptor 3. Functions: say, q,
# pycstore_binary, the_corpus, machine_info.

repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
corpus_dir=$repo/tests/corpus
bench=${BENCH_DIR:-$HOME/.cache/pycstore-bench}
# $PYTHON, else the CPython 3.11 the tests use (scripts/find-python).
python=${PYTHON:-$("$repo/scripts/find-python" 3.11)}
requirements=$corpus_dir/requirements.txt
workload=$corpus_dir/import-workload.py
date=$(date +%Y-%m-%d)
results=$repo/benches/results
# Taken before the run writes its results into the checkout, so a clean tree
# is not reported as dirty.
commit=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo "no commit")
# Results are recorded only for a committed tree: a figure must name the
# code it measured. PYCSTORE_BENCH_DIRTY=1 runs anyway and records nothing.
if [[ $commit == *-dirty || $commit == "no commit" ]]; then
  if [[ ${PYCSTORE_BENCH_DIRTY:-} != 1 ]]; then
    echo "benches: the checkout has uncommitted changes ($commit): commit them first, so that" \
      "the results name the code measured (PYCSTORE_BENCH_DIRTY=1 runs anyway and records nothing)" >&2
    exit 2
  fi
  results=$(mktemp -d -t pycstore-bench-results.XXXXXX)
  echo "benches: dirty checkout; results go to $results, not benches/results" >&2
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pycstore-target}
# Only the tools measured may write pycs.
export PYTHONDONTWRITEBYTECODE=1
# Only the report goes to stdout; progress and hyperfine's output to stderr.
exec 3>&1 1>&2

say() { printf '\n=== %s ===\n' "$*"; }
q() { printf '%q' "$1"; }

# The pycstore to measure: $PYCSTORE, or this checkout built as users get
# it (the wheel, scripts/setup): profile dist, RocksDB linked statically
# from the system's librocksdb.a. Against the release build, which loads
# librocksdb.so, that is 2 ms less to start and 15% less for a re-link of
# the corpus (47.3 against 55.6 ms on tmpfs): calls into and within a
# shared C++ library go through its symbol tables. Without librocksdb.a,
# the release build.
pycstore_binary() {
  if [[ -n ${PYCSTORE:-} ]]; then
    echo "$PYCSTORE"
    return
  fi
  local lib=${ROCKSDB_LIB_DIR:-/usr/lib/x86_64-linux-gnu}
  if [[ -f $lib/librocksdb.a ]]; then
    say "cargo build --profile dist (RocksDB static from $lib)" >&2
    (cd "$repo" && ROCKSDB_STATIC=1 ROCKSDB_LIB_DIR=$lib cargo build --locked --profile dist -p pycstore) >&2
    echo "$CARGO_TARGET_DIR/dist/pycstore"
    return
  fi
  say "cargo build --release (no $lib/librocksdb.a: RocksDB linked dynamically)" >&2
  (cd "$repo" && cargo build --release) >&2
  echo "$CARGO_TARGET_DIR/release/pycstore"
}

# The reference corpus for $python (one per requirements, build script and
# interpreter), built by make-corpus.sh if missing; never modified.
the_corpus() {
  local corpus
  corpus=$bench/corpus-$(cat "$requirements" "$corpus_dir/make-corpus.sh" <(echo "$python") |
    sha256sum | cut -c 1-12)
  if [[ ! -e $corpus.done ]]; then
    say "building the corpus in $corpus" >&2
    rm -rf "$corpus"
    "$corpus_dir/make-corpus.sh" "$corpus" "$python" >&2
    touch "$corpus.done"
  fi
  echo "$corpus"
}

# KEY=VALUE arguments describing the run, for report.py: machine_info
# PYCSTORE CORPUS WORKDIR RUNS.
machine_info() {
  echo "date=$date"
  echo "kernel=$(uname -r)"
  echo "cpu=$(grep -m 1 '^model name' /proc/cpuinfo | cut -d : -f 2- | sed 's/^ *//')"
  echo "nproc=$(nproc)"
  echo "fs=$(findmnt -n -o FSTYPE -T "$3")"
  echo "python=$("$python" -c 'import platform; print(platform.python_version())')"
  echo "pycstore=$("$1" --version 2>/dev/null || echo "pycstore (version unknown)")"
  echo "commit=$commit"
  echo "runs=$4"
  echo "py_files=$(find "$2" -name '*.py' | wc -l)"
}
