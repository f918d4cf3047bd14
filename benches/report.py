"""What the reports of benches/*.sh share: their arguments and hyperfine's JSON.

A report runs as `python - JSON_DIR KEY=VALUE...` with this directory on
PYTHONPATH, and starts with `info, results = report.load()`.
"""
import json
import sys
from pathlib import Path


def load():
    """The KEY=VALUE arguments, and hyperfine's results by command name."""
    info = dict(arg.split("=", 1) for arg in sys.argv[2:])
    results = {}
    for path in Path(sys.argv[1]).glob("*.json"):
        for r in json.loads(path.read_text())["results"]:
            results[r["command"]] = r
    return info, results


def cell(result):
    """`mean ± σ | min` of one hyperfine result, in seconds."""
    return f"{result['mean']:.3f} ± {result['stddev'] or 0:.3f} | {result['min']:.3f}"


def ratio(slow, fast):
    """`slow / fast` of two hyperfine results: the ratio of the means, and
    the spread of the two sides (the slowest run of `slow` over the fastest
    of `fast`, and the other way round), e.g. `38.8x (35.2x-41.9x)`."""
    low = min(slow["times"]) / max(fast["times"])
    high = max(slow["times"]) / min(fast["times"])
    return f"{slow['mean'] / fast['mean']:.1f}x ({low:.1f}x-{high:.1f}x)"
