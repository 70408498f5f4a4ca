"""Stage ``coral_evaluate``: the COrAL model (``coral_stage2``'s output) on task ``job.task``'s
``eval.split`` split with decoding ``job.decoding``: ``greedy`` (AR greedy of its own +1
prediction) or ``coral_blockwise`` (sliding blockwise decoding, ``coral.decoding``), SPEC §5.
The first ``coral.n_questions`` rows, one question at a time; metrics.json adds
``forward_passes``, ``tokens_per_forward`` and wall time (:mod:`closedloop.evaluation`).
"""

from __future__ import annotations

from closedloop import config as cl_config
from closedloop import models, paths
from closedloop.coral import decoding, model
from closedloop.evaluation import FamilyDecoding, evaluate, split_rows

TAG = "coral"


def main(cfg) -> None:
    """Evaluate the COrAL model on ``cfg.job.task`` with ``cfg.job.decoding``."""
    task, mode = cfg.job.task, cfg.job.decoding
    if task is None or mode not in ("greedy", "coral_blockwise"):
        raise cl_config.ConfigError("coral_evaluate: key 'job.task' is required and key 'job.decoding' must be "
                                    f"'greedy' or 'coral_blockwise' (got {mode!r})")
    rows = split_rows(cfg, task, cfg.eval)
    if cfg.coral.n_questions:
        rows = rows[:cfg.coral.n_questions]
    model_dir = paths.coral_model_dir(cfg)

    def decode(rows_, desc):
        m = model.load(model_dir, models.DTYPES[models.dtype_name(cfg.model, inference=True)])
        tokenizer = models.load_tokenizer(str(model_dir), cfg.model)
        texts, n_tokens, extra = decoding.decode_rows(m, tokenizer, rows_, mode, cfg.coral.decoding,
                                                      cfg.eval.max_new_tokens, cfg.eval.mc_max_new_tokens, desc)
        return texts, n_tokens, {"dtype": str(m.dtype).removeprefix("torch."), **extra}

    evaluate(cfg, TAG, task, cfg.eval, rows, paths.coral_eval_dir(cfg, mode, task),
             cl_config.stage_view(cfg, "coral_evaluate", [task]), "coral_evaluate",
             family=FamilyDecoding(mode, model_dir, decode))
