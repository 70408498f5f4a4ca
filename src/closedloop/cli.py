"""``closedloop`` command line: run a stage, show the resolved config.

    closedloop run-stage sft --config configs/smoke.yaml sft.max_steps=3
    closedloop show-config --config configs/default.yaml eval.k=8
    closedloop lineage results/default/iter2/dpo      # see closedloop.lineage

``run-stage`` runs the stage in this process, or submits it to Slurm and waits for it when
the launch settings (``launch.py``: ``$CLOSEDLOOP_LAUNCH_CONFIG``, the ``slurm`` profile)
say so. Snakemake rules call ``run-stage`` with ``--config-yaml`` (the resolved view of the
config that the job depends on), ``job.*`` overrides taken from wildcards and ``--log``: the
stage's output and progress bars go to the job's log file and the console gets one line per
job (the last lines of the log when it fails), so concurrent jobs do not interleave.

Output into a closed pipe (``closedloop lineage --json | head``) ends quietly with status 141
(128 + SIGPIPE, as a C tool killed by the signal would report).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from closedloop import artifacts, launch, paths, stage_table
from closedloop import config as cl_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="closedloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run-stage", "run one pipeline stage in this process"),
                            ("show-config", "print the resolved config as YAML")):
        p = sub.add_parser(name, help=help_text)
        if name == "run-stage":
            p.add_argument("stage", choices=list(stage_table.STAGES))
        p.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="YAML file merged over the embedded defaults (repeatable, in order)")
        p.add_argument("--config-yaml", default=None, help=argparse.SUPPRESS)
        if name == "show-config":
            p.add_argument("--report-path", action="store_true", help="print only where each family's report is written")
        else:
            p.add_argument("--log", default=None, metavar="FILE",
                           help="write the stage's output to FILE; print one summary line here")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides")
    sub.add_parser("lineage", add_help=False, help="an artifact's lineage; verify, push, pull (lineage --help)")
    plan = sub.add_parser("plan-resources", help="per-stage GPU-memory estimates against the launch settings")
    plan.add_argument("--config", action="append", default=[], metavar="FILE", help="experiment YAML (repeatable)")
    plan.add_argument("--launch", action="append", default=[], metavar="FILE",
                      help="launch settings YAML (default: <config>.launch.yaml beside the last --config if it "
                           "exists, else $CLOSEDLOOP_LAUNCH_CONFIG)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides")
    return parser


def plan_resources(args) -> int:
    """``closedloop plan-resources``: the estimate table of :mod:`closedloop.plan`."""
    from closedloop import plan

    cfg = cl_config.load(args.config, args.overrides)
    files = list(args.launch)
    if not files and args.config:
        beside = Path(args.config[-1]).with_suffix(".launch.yaml")
        files = [str(beside)] if beside.is_file() else []
    settings = launch.load_settings(files) if files else launch.settings()
    given = {}
    for path in args.config:  # a config that sets vlm: and not model: is a V-DPO experiment
        given.update(cl_config.load_yaml(Path(path)) or {})
    vlm = "vlm" in given and "model" not in given
    stages = ["vlm_sft", "vdpo", "pope"] if vlm else ["sft", "dpo", "evaluate", "mcts"]
    print(f"GPU memory per stage (GiB), launch settings: {', '.join(files) or '$' + launch.ENV_FILES}")
    print(plan.table(plan.plan(cfg, settings, stages)))
    return 0


def resolve(args) -> OmegaConf:
    if args.config_yaml is not None:
        view = OmegaConf.create(args.config_yaml)
        base = cl_config.merge(OmegaConf.structured(cl_config.ExperimentConfig), view, "--config-yaml")
        return cl_config.merge(base, OmegaConf.from_dotlist(args.overrides), "command line")
    return cl_config.load(args.config, args.overrides)


def _exit_on_sigterm(signum, frame):
    """Turn SIGTERM (Snakemake, Slurm) into SystemExit so temporary artifacts are removed."""
    sys.exit(128 + signum)


EPIPE_STATUS = 128 + signal.SIGPIPE
LOG_TAIL_LINES = 80  # a failed Slurm job's report (its 40 stderr lines and their header) fits


def _quiet_broken_pipe() -> int:
    """The reader of our stdout went away (``| head``): no traceback, now or at exit's flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EPIPE_STATUS


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # output still buffered meets a closed pipe here, not in the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _job_label(stage: str, cfg) -> str:
    job = {k: v for k, v in (cfg.get("job") or {}).items() if v is not None and k != "variant"}
    if (cfg.get("job") or {}).get("variant") not in (None, "closedloop"):
        job["variant"] = cfg.job.variant
    return stage + "".join(f" {k}={v}" for k, v in job.items())


def _last_lines(path: Path, n: int) -> list[str]:
    text = path.read_text(errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-n:]


def _one_line(stage: str, err: Exception) -> tuple[str, int]:
    """The console line and exit status of an error whose message says it all: a bad data or
    model file (its name and line; exit 2) or an input that no longer matches its producer's
    record (the file, the artifact and the command that rebuilds it; its message starts with
    the stage; exit 3)."""
    if isinstance(err, artifacts.StaleInputError):
        return f"closedloop: {err}", 3
    return f"closedloop: {stage}: {err}", 2


def run_logged(stage: str, cfg, log: Path) -> int:
    """Run the stage with stdout and stderr (its progress bars included) redirected into ``log``;
    print one line to the console when it ends: the time, the stage's last output line and the
    log's path, or, when it fails, the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console, console_err = os.fdopen(os.dup(1), "w"), os.fdopen(os.dup(2), "w")
    with open(log, "w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    os.environ.setdefault("TQDM_MININTERVAL", "5")  # a bar in a file: a line every few seconds, not 10 a second
    label, start, reason = _job_label(stage, cfg), time.monotonic(), None
    try:
        status = launch.run_stage(stage, cfg)
    except cl_config.ConfigError as err:
        print(f"closedloop: config error: {err}", file=sys.stderr)
        status = 2
    except (cl_config.InputError, artifacts.StaleInputError) as err:
        reason, status = _one_line(stage, err)
    except SystemExit as err:
        status = err.code if isinstance(err.code, int) else 1
    except Exception:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    seconds = time.monotonic() - start
    if status == 0:
        lines = _last_lines(log, 10_000)
        submitted = f"closedloop: {stage}: submitted Slurm job "
        slurm = next((line[len(submitted) - len("submitted Slurm job "):].split(" (")[0] + "; "
                      for line in lines if line.startswith(submitted)), "")
        last = lines[-1].strip() if lines else ""
        print(f"closedloop: {label}: {slurm}done in {seconds:.1f} s: {last} (log: {log})", file=console, flush=True)
    else:
        if reason is not None:
            print(reason, file=sys.stderr, flush=True)
            print(reason, file=console_err, flush=True)
        tail = "\n".join(f"  | {line}" for line in _last_lines(log, LOG_TAIL_LINES))
        print(f"closedloop: {label}: FAILED (exit {status}) after {seconds:.1f} s; the last lines of {log}:\n{tail}",
              file=console_err, flush=True)
    return status


def _main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lineage"]:
        from closedloop import lineage

        return lineage.main(argv[1:])
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "plan-resources":
        try:
            return plan_resources(args)
        except cl_config.ConfigError as err:
            print(f"closedloop: config error: {err}", file=sys.stderr)
            return 2
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra  # key=value may follow the options too
    try:
        cfg = resolve(args)
    except cl_config.ConfigError as err:
        print(f"closedloop: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        if args.report_path:
            print("\n".join(f"{family}: {path.resolve()}" for family, path in paths.family_reports(cfg).items()))
        else:
            print(OmegaConf.to_yaml(cfg), end="")
        return 0
    if args.log:
        return run_logged(args.stage, cfg, Path(args.log))
    try:  # here, or as a Slurm job when the launch settings say so (launch.py)
        return launch.run_stage(args.stage, cfg)
    except cl_config.ConfigError as err:
        print(f"closedloop: config error: {err}", file=sys.stderr)
        return 2
    except (cl_config.InputError, artifacts.StaleInputError) as err:
        reason, status = _one_line(args.stage, err)
        print(reason, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
