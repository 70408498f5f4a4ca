"""How long `snakemake -n` takes: the cost of parsing the DAG (issue: the DAG never imports torch).

    python bench/dag_parse.py                     # this checkout, the default config, 5 runs
    python bench/dag_parse.py --dir /path/to/finished/run/checkout --configfile configs/smoke.yaml

Prints each run's wall time, the median, and how many jobs the dry run planned (0 on a
finished run). Measured on 2 shared CPU cores: docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def dry_run(directory: Path, configfile: str | None) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "2"] + (["--configfile", configfile] if configfile else [])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=directory, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    total = re.search(r"^total\s+(\d+)", out.stdout, re.M)
    return seconds, int(total.group(1)) if total else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--configfile", default=None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times, jobs = [], 0
    for i in range(args.runs):
        seconds, jobs = dry_run(args.dir, args.configfile)
        times.append(seconds)
        print(f"run {i + 1}: {seconds:.2f} s")
    print(f"snakemake -n: median {statistics.median(times):.2f} s over {args.runs} runs "
          f"(min {min(times):.2f}, max {max(times):.2f}); {jobs} jobs planned")


if __name__ == "__main__":
    main()
