"""``closedloop`` command line: run a stage, show the resolved config.

    closedloop run-stage sft --config configs/smoke.yaml sft.max_steps=3
    closedloop show-config --config configs/default.yaml eval.k=8
    closedloop lineage results/default/iter2/dpo      # see closedloop.lineage

``run-stage`` runs the stage in this process, or submits it to Slurm and waits for it when
the launch settings (``launch.py``: ``$CLOSEDLOOP_LAUNCH_CONFIG``, the ``slurm`` profile)
say so. Snakemake rules call ``run-stage`` with ``--config-yaml`` (the resolved view of the
config that the job depends on) and ``job.*`` overrides taken from wildcards.
"""

from __future__ import annotations

import argparse
import signal
import sys

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
            p.add_argument("--report-path", action="store_true", help="print only where the report is written")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides")
    sub.add_parser("lineage", add_help=False, help="an artifact's lineage; verify, push, pull (lineage --help)")
    return parser


def resolve(args) -> OmegaConf:
    if args.config_yaml is not None:
        view = OmegaConf.create(args.config_yaml)
        base = cl_config.merge(OmegaConf.structured(cl_config.ExperimentConfig), view, "--config-yaml")
        return cl_config.merge(base, OmegaConf.from_dotlist(args.overrides), "command line")
    return cl_config.load(args.config, args.overrides)


def _exit_on_sigterm(signum, frame):
    """Turn SIGTERM (Snakemake, Slurm) into SystemExit so temporary artifacts are removed."""
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lineage"]:
        from closedloop import lineage

        return lineage.main(argv[1:])
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
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
        print(paths.report_file(cfg).resolve() if args.report_path else OmegaConf.to_yaml(cfg), end="\n" * args.report_path)
        return 0
    try:  # here, or as a Slurm job when the launch settings say so (launch.py)
        return launch.run_stage(args.stage, cfg)
    except cl_config.ConfigError as err:
        print(f"closedloop: config error: {err}", file=sys.stderr)
        return 2
    except artifacts.StaleInputError as err:
        print(f"closedloop: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
