#!/usr/bin/env bash
# The remote tier on the reference corpus (a CPython 3.11 venv of ~7,000
# .py files): an empty local store linking a fresh copy from a warm remote,
# against compiling from scratch, for S3 (Garage), Redis and HTTP (nginx
# WebDAV) on loopback, and again with 20 ms added to every request by a
# delaying proxy (benches/delay-proxy.py).
#
#   benches/remote.sh
#
# Each case is one run: a fresh copy of the corpus without pycs, a new empty
# store, `pycstore link --json`; the requests and bytes come from its
# per-remote counters. The servers come from scripts/test-servers (Garage
# from scripts/garage). Prints a Markdown report and writes it to
# benches/results/remote-DATE.md. Scratch data lives in BENCH_DIR (default
# ~/.cache/pycstore-bench). Environment as for benches/corpus.sh.
set -euo pipefail

source "$(dirname "$0")/common.sh"

pycstore=$(pycstore_binary)
corpus=$(the_corpus)
work=$bench/remote
rm -rf "$work"
mkdir -p "$work"
servers=$work/servers
eval "$("$repo/scripts/test-servers" up "$servers")"
proxies=()
cleanup() {
  for p in "${proxies[@]}"; do kill "$p" 2>/dev/null || true; done
  "$repo/scripts/test-servers" down "$servers" >/dev/null 2>&1 || true
}
trap cleanup EXIT

export AWS_ENDPOINT_URL=$PYCSTORE_TEST_S3_ENDPOINT AWS_REGION=$PYCSTORE_TEST_S3_REGION
export AWS_ACCESS_KEY_ID=$PYCSTORE_TEST_S3_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$PYCSTORE_TEST_S3_SECRET_ACCESS_KEY
export PYCSTORE_REMOTE_HTTP_TOKEN=$PYCSTORE_TEST_WEBDAV_TOKEN
unset PYCSTORE_REMOTE PYCSTORE_REMOTE_READ_ONLY

port_of() { sed -E 's|.*127\.0\.0\.1:([0-9]+).*|\1|' <<<"$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# fresh DIR: a copy of the corpus without pycs.
fresh() {
  rm -rf "$1"
  cp -a "$corpus" "$1"
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
  sync
}

# link NAME URL...: one timed link of a fresh copy into an empty store;
# prints "seconds compiled fetched requests bytes_in".
link() {
  local name=$1
  shift
  fresh "$work/copy"
  rm -rf "$work/store"
  local args=()
  for url in "$@"; do args+=(--remote "$url"); done
  local start end
  start=$(date +%s.%N)
  "$pycstore" --store "$work/store" link "$work/copy" "${args[@]}" --remote-namespace bench --json >"$work/$name.json"
  end=$(date +%s.%N)
  python3 - "$work/$name.json" "$start" "$end" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d.get("remotes", [{}])[0] if d.get("remotes") else {}
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.2f} {d['compiled']} {d['fetched']} "
      f"{r.get('requests', 0)} {r.get('bytes_in', 0)} {r.get('bytes_out', 0)} {d['pycs']}")
PY
}

say "cold: compiling from scratch, no remote"
read -r cold_s cold_compiled _ _ _ _ pycs < <(link cold)

declare -A url=(
  [s3]="s3://$PYCSTORE_TEST_S3_BUCKET/bench"
  [redis]="$PYCSTORE_TEST_REDIS"
  [http]="$PYCSTORE_TEST_WEBDAV"
)
rows=()
for kind in s3 redis http; do
  say "$kind: warming the remote (a cold link that uploads)"
  read -r up_s _ _ up_requests _ up_bytes _ < <(link "$kind-upload" "${url[$kind]}")
  say "$kind: empty store, warm remote"
  read -r s compiled fetched requests bytes _ _ < <(link "$kind-warm" "${url[$kind]}")
  # The same through a proxy adding 20 ms to every request.
  target=${url[$kind]}
  upstream=$(port_of "${AWS_ENDPOINT_URL}")
  [[ $kind != s3 ]] && upstream=$(port_of "$target")
  port=$(free_port)
  python3 "$repo/benches/delay-proxy.py" "$port" "$upstream" 20 &
  proxies+=($!)
  sleep 0.5
  say "$kind: empty store, warm remote 20 ms away"
  if [[ $kind == s3 ]]; then
    read -r ds dcompiled dfetched drequests dbytes _ _ < <(AWS_ENDPOINT_URL=http://127.0.0.1:$port link "$kind-delayed" "$target")
  else
    read -r ds dcompiled dfetched drequests dbytes _ _ < <(link "$kind-delayed" "${target/127.0.0.1:$upstream/127.0.0.1:$port}")
  fi
  rows+=("$kind $up_s $up_requests $up_bytes $s $compiled $fetched $requests $bytes $ds $dcompiled $dfetched $drequests $dbytes")
done

report=$(python3 - "$cold_s" "$cold_compiled" "$pycs" "${rows[@]}" <<'PY'
import sys
cold, cold_compiled, pycs = float(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"Cold link of the corpus with no remote (compiling from scratch): {cold:.2f} s, "
      f"{cold_compiled} of {pycs} pycs compiled.\n")
print("| remote | upload run | requests | MiB out | warm remote | compiled | fetched | requests | MiB in | vs. cold | +20 ms/request | compiled | requests | vs. cold |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for row in sys.argv[4:]:
    k, up_s, up_r, up_b, s, c, f, r, b, ds, dc, df, dr, db = row.split()
    mib = lambda x: f"{int(x) / 2**20:.1f}"
    print(f"| {k} | {float(up_s):.2f} s | {up_r} | {mib(up_b)} | {float(s):.2f} s | {c} | {f} | {r} | {mib(b)} | "
          f"{cold / float(s):.1f}x | {float(ds):.2f} s | {dc} | {dr} | {cold / float(ds):.1f}x |")
PY
)
mkdir -p "$results"
{
  echo "# Remote tier on the reference corpus, $date"
  echo
  machine_info "$pycstore" "$corpus" "$work" 1 | sed 's/^/- /'
  echo
  echo "$report"
} | tee "$results/remote-$date.md" >&3
