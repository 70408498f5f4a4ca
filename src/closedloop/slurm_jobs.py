"""The light side of the Slurm launcher: what the waiting ``closedloop run-stage`` process does
between submitting a job and reporting its end, with no torch, transformers or stage module
imported (those load only inside the job, :class:`closedloop.launch.StageJob`).

- :class:`SharedPoller`: every waiter of one run reads job states from one small cache file
  of ``sacct`` output under the run's ``logs/slurm/``; whoever finds it older than the poll
  interval refreshes it (under a lock) with one ``sacct`` call for every job in flight, so N
  waiters cost one ``sacct`` per interval instead of N.
- :class:`CallLock` and the job record: each stage call has a work dir
  ``<results>/<experiment>/.work/slurm-<job name>-<config hash>/`` holding a lock (a second
  run of the same call fails at once, naming the holder) and ``slurm_job.json`` (the
  submitted job ids), so a run that finds a record of a job still queued or running
  re-attaches to it instead of submitting a second writer.

Launch infrastructure: no SPEC section describes it (SPEC covers the methods).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                    "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "UNKNOWN"})
"""Slurm states of a job that may still run (``UNKNOWN``: not in sacct yet, just submitted)."""
CACHE, CACHE_LOCK, INFLIGHT = ".sacct-cache.json", ".sacct-cache.lock", ".inflight"
RECORD, LOCK = "slurm_job.json", "lock"


@dataclass
class JobState:
    """One job's (or array element's) Slurm state and, while pending, the reason."""

    state: str
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def parse_sacct(text: str) -> dict[str, JobState]:
    """``sacct -X -n -P -o JobID,State,Reason`` rows by job id; a pending array's
    ``123_[0-3%2]`` row is expanded to ``123_0`` .. ``123_3``; ``CANCELLED by 0`` → ``CANCELLED``."""
    out: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        job, state = parts[0], parts[1].split()[0] if parts[1].split() else "UNKNOWN"
        reason = parts[2] if len(parts) > 2 else ""
        array = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(%\d+)?\]", job)
        if array:
            for part in array.group(2).split(","):
                low, _, high = part.partition("-")
                for i in range(int(low), int(high or low) + 1):
                    out[f"{array.group(1)}_{i}"] = JobState(state, reason)
        else:
            out[job] = JobState(state, reason)
    return out


class SharedPoller:
    """Job states for every waiter of one run through one throttled ``sacct`` call.

    ``folder`` is the run's submitit folder (``logs/slurm``). Each waiter registers its ids
    under ``.inflight/`` (touched at every poll); :meth:`states` returns the cached states
    when the cache is younger than ``max_age_s``, else refreshes it under an exclusive
    ``flock`` with one ``sacct`` call over all registered ids (plus one ``squeue`` for the jobs
    sacct lists as pending or not yet: their live state and reason; ids not touched for
    ``3 * max_age_s + 60`` s, e.g. of a killed waiter, are dropped). A job submitted since
    the last refresh reads ``UNKNOWN`` (still waiting) until the next one: twenty waiters
    that submit within one interval cost one ``sacct`` call, not twenty.
    """

    def __init__(self, folder: Path, max_age_s: float):
        self.folder, self.max_age_s = Path(folder), float(max_age_s)
        self.inflight = self.folder / INFLIGHT
        self.inflight.mkdir(parents=True, exist_ok=True)

    def register(self, job_ids: list[str]) -> None:
        for job in job_ids:
            (self.inflight / job).touch()

    def unregister(self, job_ids: list[str]) -> None:
        for job in job_ids:
            (self.inflight / job).unlink(missing_ok=True)

    def states(self, job_ids: list[str], force: bool = False) -> dict[str, JobState]:
        """States of ``job_ids`` (``UNKNOWN`` for a job the cache does not list yet); ``force``: refresh now."""
        self.register(job_ids)
        with open(self.folder / CACHE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cached = self._read()
            fresh = time.time() - cached.get("time", 0) < self.max_age_s
            if force or not fresh:
                cached = self._refresh()
        known = cached["states"]
        return {j: JobState(*known[j]) if j in known else JobState("UNKNOWN") for j in job_ids}

    def _read(self) -> dict:
        try:
            return json.loads((self.folder / CACHE).read_text())
        except (OSError, ValueError):
            return {}

    def _refresh(self) -> dict:
        now = time.time()
        ids = []
        for path in self.inflight.iterdir():
            try:
                if now - path.stat().st_mtime > 3 * self.max_age_s + 60:
                    path.unlink(missing_ok=True)
                else:
                    ids.append(path.name)
            except FileNotFoundError:
                pass
        states: dict[str, JobState] = {}
        if ids:
            out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Reason", "-j", ",".join(sorted(ids))])
            states = parse_sacct(out)
            # slurmdbd records a new job and its pending reason late (minutes on a loaded machine): the
            # controller's squeue has them now, for jobs sacct lists as pending or not at all
            ask = sorted({j.split("_")[0] for j in {*ids, *states} if j not in states or states[j].state == "PENDING"})
            if ask:
                live = parse_sacct(_run(["squeue", "-h", "-j", ",".join(ask), "-o", "%i|%T|%r"]))
                states.update({j: s for j, s in live.items() if j not in states or states[j].state == "PENDING"})
        blob = {"time": time.time(), "states": {j: [s.state, s.reason] for j, s in states.items()}}
        # stamped when sacct answered: a slow controller does not make the next waiter refresh at once
        tmp = self.folder / f"{CACHE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(blob))
        tmp.replace(self.folder / CACHE)  # readers see the old or the new cache, never half of one
        return blob


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""  # a slow or briefly absent controller: the jobs read as UNKNOWN (still waiting)


class CallBusy(RuntimeError):
    """Another process holds the lock of this stage call's work dir."""


class CallLock:
    """An exclusive, non-blocking ``flock`` on ``<call dir>/lock`` for the life of a run; the
    file names the holder (pid, host, start) so the error of a second run can say who.
    The kernel drops the lock when the holder dies, SIGKILL included."""

    def __init__(self, call_dir: Path):
        self.dir = Path(call_dir)
        self.path = self.dir / LOCK
        self._fh = None

    def __enter__(self) -> CallLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            raise CallBusy(f"{self.path} is held by {holder}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def write_record(call_dir: Path, record: dict) -> None:
    """``slurm_job.json`` (job ids, submitit folder, tasks per job), written to a temp file then renamed."""
    tmp = Path(call_dir) / f".{RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({**record, "pid": os.getpid(), "host": socket.gethostname(),
                               "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    tmp.replace(Path(call_dir) / RECORD)


def read_record(call_dir: Path) -> dict | None:
    try:
        return json.loads((Path(call_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def clear(call_dir: Path) -> None:
    """Remove the record and the call dir (the lock file goes with it; its holder is this process)."""
    for name in (RECORD, LOCK):
        (Path(call_dir) / name).unlink(missing_ok=True)
    try:
        Path(call_dir).rmdir()
    except OSError:
        pass
