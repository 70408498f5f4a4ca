"""Measure N ``closedloop run-stage`` waiters in flight on a real Slurm (scripts/slurm/up.sh).

Each waiter submits one held job (``sbatch --hold``: it stays pending, nothing computes) for a
distinct evaluation of one run, so all share the run's logs dir. ``sacct``/``squeue`` on PATH are
wrapped to count their calls; after every waiter has submitted, calls are counted for
``--seconds``; then the waiters get SIGTERM (they cancel their jobs). Prints a markdown row:
waiters, poll seconds, sacct and squeue calls per minute, median/max peak RSS (VmHWM) and
median seconds from start to the "submitted" line.

    PYTHONPATH=src python scripts/slurm/bench_waiters.py --n 20 --poll 15 --seconds 60
    PYTHONPATH=/tmp/old/src python scripts/slurm/bench_waiters.py ...   # the same for another checkout
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shim(bin_dir: Path, log: Path) -> None:
    """``sacct``/``squeue`` wrappers that log one line per call, then run the real command."""
    for name in ("sacct", "squeue"):
        real = shutil.which(name)
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho {name} $(date +%s.%N) $PPID >> {log}\nexec {real} \"$@\"\n")
        script.chmod(0o755)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--poll", type=float, default=15)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-waiters-"))
    (tmp / "bin").mkdir()
    calls = tmp / "calls.log"
    shim(tmp / "bin", calls)
    launch = tmp / "launch.yaml"
    launch.write_text(f"launcher: slurm\nslurm:\n  job_name_prefix: clbench\n  poll_seconds: {args.poll}\n"
                      "  defaults: {cpus_per_task: 1, mem_gb: 1, timeout_min: 10, extra: {hold: true}}\n")
    env = {**os.environ, "PATH": f"{tmp / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CLOSEDLOOP_LAUNCH_CONFIG": str(launch)}
    env.pop("CLOSEDLOOP_LAUNCHER", None)
    procs, started = [], []
    for i in range(args.n):
        cmd = [sys.executable, "-m", "closedloop", "run-stage", "evaluate", "--config", str(ROOT / "configs" / "smoke.yaml"),
               f"results_dir={tmp / 'results'}", "job.model=base", "job.task=synthetic", f"eval.n_bootstrap={1000 + i}"]
        started.append(time.time())
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    to_submit = []
    for proc, t0 in zip(procs, started, strict=True):
        line = proc.stdout.readline()
        while line and "submitted Slurm job" not in line:
            line = proc.stdout.readline()
        assert line, f"waiter {proc.pid} ended before submitting"
        to_submit.append(time.time() - t0)
    calls.write_text("")
    time.sleep(args.seconds)
    counted = [line.split()[0] for line in calls.read_text().splitlines()]
    if os.environ.get("BENCH_KEEP"):
        print(calls.read_text(), tmp)
    rss = []
    for proc in procs:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024)
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=120)
    subprocess.run(["scancel", "-n", "clbench-evaluate-base-synthetic"], check=False)
    per_min = 60 / args.seconds
    print("| waiters | poll s | sacct calls/min | squeue calls/min | peak RSS MB (median / max) | start to submitted s (median) |")
    print(f"| {args.n} | {args.poll:g} | {counted.count('sacct') * per_min:.1f} | {counted.count('squeue') * per_min:.1f} "
          f"| {statistics.median(rss):.0f} / {max(rss):.0f} | {statistics.median(to_submit):.2f} |")
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
