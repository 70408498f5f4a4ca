"""Stage ``coral_stage2``: COrAL post-training stage 2 (SPEC §5) — the whole model, from stage 1's
output, on the ``coral.task`` training solutions (:mod:`closedloop.coral.trainer`).

Output ``results/<experiment>/coral/stage2/``: ``model/`` (a plain Llama ``from_pretrained`` dir with
the ``coral`` marker in config.json), ``train_log.csv``, ``stats.json``.
"""

from __future__ import annotations

from closedloop.coral.trainer import train_stage


def main(cfg) -> None:
    """Train COrAL stage 2."""
    train_stage(cfg, 2)
