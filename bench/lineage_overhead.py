"""Lineage + DVC cost per stage on small artifacts (goal: ≤ 2 s per stage).

Builds a chain of ``--stages`` small artifacts (``--size-kb`` each, one input each) in a
temp git + DVC repo, every stage in a fresh Python process as under Snakemake, three ways:

    plain       the payload written with open(), nothing else
    provenance  closedloop.artifacts.artifact_dir with CLOSEDLOOP_DVC=0 (hashes, records, rename)
    lineage     artifact_dir with DVC recording (dvc add under the lock): what stages do now

and reports the median wall time per stage of each, the lineage + DVC cost per stage
(lineage − plain), and the time of ``closedloop lineage <last>`` and ``lineage verify``.

    python bench/lineage_overhead.py [--stages 8] [--size-kb 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGE = """
import os, sys
from pathlib import Path
mode, i, kb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
final = Path(f"results/{mode}/s{i}")
prev = Path(f"results/{mode}/s{i - 1}") if i else Path("data/bench/raw")
payload = (f"stage {i} " * 16 + "\\n") * (kb * 1024 // 129 + 1)
if mode == "plain":
    final.mkdir(parents=True, exist_ok=True)
    (final / "out.jsonl").write_text(payload)
else:
    from closedloop import artifacts
    with artifacts.artifact_dir(final, "bench", {"seed": i}, {"prev": prev}, i) as out:
        (out / "out.jsonl").write_text(payload)
"""


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}: {out.stderr[-2000:]}")
    return out


def make_repo(where: Path) -> Path:
    repo = where / "repo"
    repo.mkdir()
    for name in (".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    sh(["git", "init", "-q"], repo)
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo)
    (repo / "data" / "bench" / "raw").mkdir(parents=True)
    (repo / "data" / "bench" / "raw" / "rows.jsonl").write_text("raw\n" * 1000)
    sh([sys.executable, "-m", "dvc", "add", "-q", "data"], repo)
    return repo


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    sh(cmd, cwd, env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--size-kb", type=int, default=256)
    args = parser.parse_args()
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                         os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp))
        times: dict[str, list[float]] = {}
        for mode, dvc in (("plain", "0"), ("provenance", "0"), ("lineage", "auto")):
            env = {**base_env, "CLOSEDLOOP_DVC": dvc}
            times[mode] = [timed([sys.executable, "-c", STAGE, mode, str(i), str(args.size_kb)], repo, env)
                           for i in range(args.stages)]
        last = f"results/lineage/s{args.stages - 1}"
        show = timed([sys.executable, "-m", "closedloop", "lineage", last], repo, base_env)
        verify = timed([sys.executable, "-m", "closedloop", "lineage", "verify", last], repo, base_env)
        n_dvc = len(list((repo / "results" / "lineage").glob("*.dvc")))
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    print(f"{args.stages} stages, {args.size_kb} KiB each, one process per stage ({n_dvc} .dvc files written)")
    for mode, ts in times.items():
        print(f"  {mode:<11} median {med[mode]:.3f} s/stage  (min {min(ts):.3f}, max {max(ts):.3f})")
    cost = med["lineage"] - med["plain"]
    print(f"  provenance cost  {med['provenance'] - med['plain']:.3f} s/stage")
    print(f"  DVC record cost  {med['lineage'] - med['provenance']:.3f} s/stage")
    print(f"  lineage + DVC    {cost:.3f} s/stage  (goal <= 2 s: {'met' if cost <= 2 else 'MISSED'})")
    print(f"  closedloop lineage <last>: {show:.3f} s;  lineage verify <last>: {verify:.3f} s")


if __name__ == "__main__":
    main()
