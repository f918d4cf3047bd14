#!/usr/bin/env bash
# Build the reference corpus: a CPython 3.11 venv holding real packages, with
# no .pyc files at all, for benchmarks and end-to-end tests.
#
#   make-corpus.sh DEST [PYTHON]
#
# DEST must not exist yet. PYTHON defaults to the CPython 3.11 that
# scripts/find-python finds.
# pip's download cache makes later builds fast.
set -euo pipefail
dest=${1:?usage: make-corpus.sh DEST [PYTHON]}
here=$(cd "$(dirname "$0")" && pwd)
py=${2:-$("$here/../../scripts/find-python" 3.11)}
if [ -e "$dest" ]; then echo "make-corpus: $dest exists" >&2; exit 2; fi
"$py" -m venv "$dest"
"$dest/bin/python" -m pip install --quiet --no-compile \
    --disable-pip-version-check -r "$here/requirements.txt"
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
files=$(find "$dest" -name '*.py' | wc -l)
bytes=$(find "$dest" -name '*.py' -printf '%s\n' | awk '{s+=$1} END {print s}')
echo "corpus: $dest: $files .py files, $bytes bytes of source, 0 .pyc"
