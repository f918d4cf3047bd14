#!/usr/bin/env bash
# The remote tier on the reference corpus (a CPython 3.11 venv of ~7,000
# .py files): an empty local store linking a fresh copy from a warm remote,
# against compiling from scratch, for S3 (Garage), Redis and HTTP (nginx
# WebDAV) on loopback, and again with 20 ms added to every request by a
# delaying proxy (benches/delay-proxy, a small workspace member built
# here).
#
#   benches/remote.sh            (RUNS=3: timed runs of each case)
#
# Each timed run is a fresh copy of the corpus without pycs, a new empty
# store, `pycstore link --json`; the requests and bytes come from its
# per-remote counters. The cold link and every warm case are run RUNS
# times; the report gives the median of each with its range (min-max), and
# each ratio as median against median, with the worst pairing (slowest
# warm run against fastest cold run) beside it. One run per case swung a
# ratio by 20% from run to run on this machine. The servers come from scripts/test-servers (Garage
# from scripts/garage). Prints a Markdown report and writes it to
# benches/results/remote-DATE.md. Scratch data lives in BENCH_DIR (default
# ~/.cache/pycstore-bench); the run needs about 0.6 GB there per timed run
# (20 GB with RUNS=3: every run keeps its copy and store until the end, see
# below). Environment as for
# benches/corpus.sh.
#
# Nothing is deleted while runs are timed. On ext4 without a journal, every
# file created skips the inodes freed in the last minute (five while their
# inode table is not yet written back): a link right after `rm -rf` of a
# corpus copy spends seconds of system time there, more than the link
# itself. So each case has its own copy and store, all removed at the end,
# and on such a filesystem the first timed run waits until ten minutes
# after the last removal (this script's, of a previous run's leftovers, or
# of the end of the previous run), synced: the links themselves keep the
# inode tables dirty, so a minute is not enough (measured: warm links of 4 s
# instead of 0.8 s two minutes after a removal). Removals by others are not
# known here: leave the machine alone for ten minutes before a run. Five
# were not enough twice: runs started five minutes after the previous
# run's removal of 6 GB had their cold link and S3 cases slow (S3 warm
# 2.5 s against 0.6-0.7 s), and their Redis and HTTP cases, a minute
# later, were not.
set -euo pipefail

source "$(dirname "$0")/common.sh"

pycstore=$(pycstore_binary)
say "cargo build --release -p pycstore-delay-proxy"
(cd "$repo" && cargo build --release -p pycstore-delay-proxy)
proxy_bin=$CARGO_TARGET_DIR/release/delay-proxy
corpus=$(the_corpus)
work=$bench/remote
removed_mark=$bench/.remote-removed
remove_work() {
  if [[ -e $work ]]; then
    rm -rf "$work"
    sync
    touch "$removed_mark"
  fi
}
remove_work
mkdir -p "$work"
servers=$work/servers
eval "$("$repo/scripts/test-servers" up "$servers")"
proxies=()
cleanup() {
  for p in "${proxies[@]}"; do kill "$p" 2>/dev/null || true; done
  "$repo/scripts/test-servers" down "$servers" >/dev/null 2>&1 || true
  remove_work
}
trap cleanup EXIT

export AWS_ENDPOINT_URL=$PYCSTORE_TEST_S3_ENDPOINT AWS_REGION=$PYCSTORE_TEST_S3_REGION
export AWS_ACCESS_KEY_ID=$PYCSTORE_TEST_S3_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$PYCSTORE_TEST_S3_SECRET_ACCESS_KEY
export PYCSTORE_REMOTE_HTTP_TOKEN=$PYCSTORE_TEST_WEBDAV_TOKEN
unset PYCSTORE_REMOTE PYCSTORE_REMOTE_READ_ONLY

port_of() { sed -E 's|.*127\.0\.0\.1:([0-9]+).*|\1|' <<<"$1"; }

# Whether creating files on the work directory's filesystem pays for
# recently freed inodes (ext4 without a journal; see above).
pays_for_freed_inodes() {
  local fstype dev
  fstype=$(findmnt -n -o FSTYPE -T "$work")
  dev=$(basename "$(findmnt -n -o SOURCE -T "$work")")
  [[ $fstype == ext4 ]] && ! compgen -G "/proc/fs/jbd2/$dev-*" >/dev/null
}

# Waits until the last removal is ten minutes old (nothing is removed
# after).
settle() {
  sync
  pays_for_freed_inodes || return 0
  local last wait
  last=$(stat -c %Y "$removed_mark" 2>/dev/null || echo 0)
  wait=$((last + 601 - $(date +%s)))
  if ((wait > 0)); then
    say "waiting ${wait}s: inodes freed in the last ten minutes slow every file creation here"
    sleep "$wait"
  fi
}

# link NAME URL...: one timed link of a fresh copy (its own) into an empty
# store (its own), in the remotes' namespace $namespace (default bench),
# read-only when $read_only is 1; prints "seconds compiled fetched requests bytes_in
# bytes_out pycs" (and only that on stdout: it is read from a pipe).
link() {
  local name=$1
  shift
  local copy=$work/copy-$name store=$work/store-$name
  cp -a "$corpus" "$copy"
  find "$copy" -name __pycache__ -prune -exec rm -rf {} +
  sync
  local args=(--remote-namespace "${namespace:-bench}")
  for url in "$@"; do args+=(--remote "$url"); done
  [[ ${read_only:-} == 1 ]] && args+=(--remote-read-only)
  local start end
  start=$(date +%s.%N)
  "$pycstore" --store "$store" link "$copy" "${args[@]}" --json >"$work/$name.json"
  end=$(date +%s.%N)
  python3 - "$work/$name.json" "$start" "$end" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d.get("remotes", [{}])[0] if d.get("remotes") else {}
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.2f} {d['compiled']} {d['fetched']} "
      f"{r.get('requests', 0)} {r.get('bytes_in', 0)} {r.get('bytes_out', 0)} {d['pycs']}")
PY
}

# The CPU seconds a process used so far (user and system).
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"
}

# Waits (at most 60 s) until the servers are idle: under 0.02 s of CPU in
# half a second, all together. A warm link is timed against an idle server,
# as the next machine finds it: not while Garage still writes the blocks
# and metadata of the upload run before it (its upload runs take twice as
# long as Redis's and nginx's). Says how long it waited.
quiet_servers() {
  local pids=() pidfile waited=0
  for pidfile in "$servers"/*/*.pid; do
    [[ -f $pidfile ]] && pids+=("$(cat "$pidfile")")
  done
  sync
  # The servers' CPU seconds so far, all together.
  servers_cpu() {
    local pid
    for pid in "${pids[@]}"; do cpu_seconds "$pid" 2>/dev/null && echo; done |
      awk '{t += $1} END {printf "%.2f", t}'
  }
  while ((waited < 120)); do
    local before after
    before=$(servers_cpu)
    sleep 0.5
    waited=$((waited + 1))
    after=$(servers_cpu)
    awk -v a="$after" -v b="$before" 'BEGIN {exit !(a - b < 0.02)}' && break
  done
  echo "servers idle after $((waited / 2)).$((waited % 2 * 5)) s" >&2
}

settle
load_before=$(cut -d ' ' -f 1-3 /proc/loadavg)

runs=${RUNS:-3}
cold_runs=()
for i in $(seq "$runs"); do
  say "cold: compiling from scratch, no remote (run $i of $runs)"
  read -r cold_s cold_compiled _ _ _ _ pycs < <(link "cold-$i")
  cold_runs+=("$cold_s")
done

declare -A url=(
  [s3]="s3://$PYCSTORE_TEST_S3_BUCKET/bench"
  [redis]="$PYCSTORE_TEST_REDIS"
  [http]="$PYCSTORE_TEST_WEBDAV"
)
rows=()
for kind in s3 redis http; do
  say "$kind: warming the remote (a cold link that uploads)"
  read -r up_s _ _ up_requests _ up_bytes _ < <(link "$kind-upload" "${url[$kind]}")
  warm_runs=()
  for i in $(seq "$runs"); do
    say "$kind: empty store, warm remote (run $i of $runs)"
    quiet_servers
    read -r s compiled fetched requests bytes _ _ < <(link "$kind-warm-$i" "${url[$kind]}")
    warm_runs+=("$s")
  done
  # The same through a proxy adding 20 ms to every request.
  target=${url[$kind]}
  upstream=$(port_of "${AWS_ENDPOINT_URL}")
  [[ $kind != s3 ]] && upstream=$(port_of "$target")
  "$proxy_bin" 0 "$upstream" 20 >"$work/proxy-$kind.port" &
  proxy=$!
  proxies+=("$proxy")
  for _ in $(seq 100); do
    [[ -s $work/proxy-$kind.port ]] && break
    sleep 0.05
  done
  port=$(cat "$work/proxy-$kind.port")
  delayed_runs=()
  for i in $(seq "$runs"); do
    say "$kind: empty store, warm remote 20 ms away (proxy on port $port; run $i of $runs)"
    quiet_servers
    if [[ $kind == s3 ]]; then
      read -r ds dcompiled dfetched drequests dbytes _ _ < <(AWS_ENDPOINT_URL=http://127.0.0.1:$port link "$kind-delayed-$i" "$target")
    else
      read -r ds dcompiled dfetched drequests dbytes _ _ < <(link "$kind-delayed-$i" "${target/127.0.0.1:$upstream/127.0.0.1:$port}")
    fi
    delayed_runs+=("$ds")
  done
  proxy_cpu=$(cpu_seconds "$proxy")
  kill "$proxy"
  # The flow for untrusted jobs: a trusted store pushes (here the first
  # cold run's), readers link read-only.
  say "$kind: push from the cold run's store (namespace bench-push)"
  "$pycstore" --store "$work/store-cold-1" push "$work/copy-cold-1" --remote "${url[$kind]}" \
    --remote-namespace bench-push --json >"$work/$kind-push.json"
  pushed_runs=()
  for i in $(seq "$runs"); do
    say "$kind: empty store, read-only, remote warmed by push (run $i of $runs)"
    quiet_servers
    read -r ps pcompiled _ prequests _ _ _ < <(namespace=bench-push read_only=1 link "$kind-pushed-$i" "${url[$kind]}")
    pushed_runs+=("$ps")
  done
  # Times of the runs joined by commas; the counts are the last run's.
  rows+=("$kind $up_s $up_requests $up_bytes $(IFS=,; echo "${warm_runs[*]}") $compiled $fetched $requests $bytes $(IFS=,; echo "${delayed_runs[*]}") $dcompiled $dfetched $drequests $dbytes $proxy_cpu $(IFS=,; echo "${pushed_runs[*]}") $pcompiled $prequests")
done
load_after=$(cut -d ' ' -f 1-3 /proc/loadavg)

report=$(python3 - "$(IFS=,; echo "${cold_runs[*]}")" "$cold_compiled" "$pycs" "$load_before" "$load_after" "${rows[@]}" <<'PY'
import statistics, sys
times = lambda arg: sorted(float(t) for t in arg.split(","))
colds, cold_compiled, pycs = times(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cold = statistics.median(colds)
load_before, load_after = sys.argv[4], sys.argv[5]
spread = lambda ts: f"{statistics.median(ts):.2f} s ({ts[0]:.2f}-{ts[-1]:.2f})" if len(ts) > 1 else f"{ts[0]:.2f} s"
ratio = lambda ts: f"{cold / statistics.median(ts):.1f}x ({colds[0] / ts[-1]:.1f}x)"
print(f"Cold link of the corpus with no remote (compiling from scratch), {len(colds)} runs: "
      f"median {spread(colds)}, {cold_compiled} of {pycs} pycs compiled. Load average "
      f"(1, 5, 15 min) before the runs: {load_before}; after: {load_after}.\n")
print(f"Times are medians of {len(colds)} runs (range in brackets); ratios are the median "
      "cold link against the median warm link, the worst pairing (fastest cold run, "
      "slowest warm run) in brackets. Counts are the last run's.\n")
print("| remote | upload run | requests | MiB out | warm remote | compiled | fetched | requests | MiB in | vs. cold | +20 ms/request | compiled | fetched | requests | MiB in | vs. cold | proxy CPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
mib = lambda x: f"{int(x) / 2**20:.1f}"
for row in sys.argv[6:]:
    k, up_s, up_r, up_b, s, c, f, r, b, ds, dc, df, dr, db, pcpu = row.split()[:15]
    s, ds = times(s), times(ds)
    print(f"| {k} | {float(up_s):.2f} s | {up_r} | {mib(up_b)} | {spread(s)} | {c} | {f} | {r} | {mib(b)} | "
          f"{ratio(s)} | {spread(ds)} | {dc} | {df} | {dr} | {mib(db)} | {ratio(ds)} | {pcpu} s |")
print("\nA remote warmed by `pycstore push` (from the first cold run's store, in a "
      "namespace of its own), read by links with `--remote-read-only`, as untrusted "
      "jobs do:\n")
print("| remote | pushed, read-only | compiled | requests | vs. cold |")
print("|---|---|---|---|---|")
for row in sys.argv[6:]:
    k = row.split()[0]
    ps, pc, pr = row.split()[15:18]
    ps = times(ps)
    print(f"| {k} | {spread(ps)} | {pc} | {pr} | {ratio(ps)} |")
print()
for row in sys.argv[6:]:
    k, _, up_r, up_b, _, _, _, r, b = row.split()[:9]
    print(f"- {k}: per pyc, {int(r) / pycs:.2f} requests and {int(b) / pycs / 1024:.1f} KiB in "
          f"from the warm remote; {int(up_r) / pycs:.2f} requests and "
          f"{int(up_b) / pycs / 1024:.1f} KiB out to warm it")
print("\nTargets: at least 10x faster than the cold link on loopback, 4x at +20 ms per request.")
PY
)
mkdir -p "$results"
{
  echo "# Remote tier on the reference corpus, $date"
  echo
  machine_info "$pycstore" "$corpus" "$work" "$runs" | sed 's/^/- /'
  echo
  echo "$report"
} | tee "$results/remote-$date.md" >&3
