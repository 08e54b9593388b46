"""Per-run overhead of the code sandbox, this checkout against another one (e.g. a `git worktree` of an older commit).

    python benchmarks/bench_sandbox.py --other /work/wt-sandbox-old --runs 30

Each side runs in its own process (its own `trl_pplmask` on `PYTHONPATH`), sequentially, one run at a time:
`run_code("pass")` and one MBPP verification (the row's reference code), median wall-clock seconds of `--runs` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


_MEASURE = r"""
import json, statistics, sys, time
from trl_pplmask.sandbox import SandboxConfig, run_code
from trl_pplmask.verifiers import get_verifier
runs = int(sys.argv[1])
row = {"test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}
verify = get_verifier("mbpp")
run_code("pass")  # probes and caches
out = {}
solution = "def add(a, b):\n    return a + b"
for name, call in (("run_code", lambda: run_code("pass")), ("verify_mbpp", lambda: verify(row, solution))):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    out[name] = statistics.median(times)
print(json.dumps(out))
"""


def measure(checkout: Path, runs: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(runs)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="Checkout to compare with (older sandbox).")
    parser.add_argument("--runs", type=int, default=30, help="Runs per measurement (median reported).")
    args = parser.parse_args()
    here = measure(Path(__file__).resolve().parents[1], args.runs)
    other = measure(args.other, args.runs)
    print(f"{'measure':<14}{'other (s)':>12}{'this (s)':>12}{'this/other':>12}")
    for name in here:
        print(f"{name:<14}{other[name]:>12.4f}{here[name]:>12.4f}{here[name] / other[name]:>12.2f}")


if __name__ == "__main__":
    main()
