"""Stage ``coral_stage1``: COrAL post-training stage 1 (SPEC §5) — the last decoder layer + lm_head of
the input policy (``coral.init``: the loop's last policy or the SFT model), on the ``coral.task`` training solutions (:mod:`closedloop.coral.trainer`).

Output ``results/<experiment>/coral/stage1/``: ``model/`` (a plain Llama ``from_pretrained`` dir with
the ``coral`` marker in config.json), ``train_log.csv``, ``stats.json``.
"""

from __future__ import annotations

from closedloop.coral.trainer import train_stage


def main(cfg) -> None:
    """Train COrAL stage 1."""
    train_stage(cfg, 1)
