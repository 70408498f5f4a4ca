"""Conservative DPO with a per-pair label-smoothing α (SPEC §3), on TRL's DPOTrainer.

Loss per pair: ℓ = −(1−α)·log σ(βh) − α·log σ(−βh), with
h = [log πθ(y_w|x) − log π_ref(y_w|x)] − [log πθ(y_l|x) − log π_ref(y_l|x)] summed over
the response tokens, α read per pair from the data's ``alpha`` column.

Since −log σ(−x) = −log σ(x) + x, the loss is TRL's ``sigmoid`` DPO loss plus α·β·h.
:class:`ConservativeDPOTrainer` therefore lets TRL compute everything it already does
(tokenisation, reference log-probs, the sigmoid loss, its metrics) and adds the α·β·h
term, with h rebuilt from the very log-prob tensors TRL's forward passes returned
(captured by forward hooks: no extra forward pass). Written by hand: only that term.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer


class AlphaCollator:
    """Wraps TRL's preference collator and carries the per-pair ``alpha`` column along."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator([{k: v for k, v in e.items() if k != "alpha"} for e in examples])
        if examples and "alpha" in examples[0]:
            batch["alpha"] = torch.tensor([float(e["alpha"]) for e in examples], dtype=torch.float32)
        return batch


class ConservativeDPOTrainer(DPOTrainer):
    """TRL DPOTrainer with the cDPO loss of SPEC §3 and α per pair from the dataset.

    A dataset without an ``alpha`` column trains plain sigmoid DPO (α = 0). ``loss_type``
    ``["sigmoid", "sft"]`` with ``loss_weights`` ``[1, λ]`` adds TRL's NLL term on the chosen
    response, λ·(−mean log πθ(y_w|x) per token): RPO (Pang et al. 2024), which keeps DPO from
    lowering the chosen answer's likelihood along with the rejected one's. Responses that
    end in a newline are partial solutions (one MCTS step): they get no EOS token. TRL's
    ``loss_weights`` (one weight w for the one sigmoid loss) scales the whole cDPO loss,
    w·[−(1−α)·log σ(βh) − α·log σ(−βh)], the α·β·h term included (SPEC §3).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unsupported = {
            "loss_type": self.loss_types not in (["sigmoid"], ["sigmoid", "sft"]),
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "loss_weights": len(self.loss_weights) != len(self.loss_types),
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError("ConservativeDPOTrainer supports sigmoid DPO (loss_type ['sigmoid'], or ['sigmoid', 'sft'] "
                             f"for RPO's NLL term on the chosen response) only; unsupported settings: {bad}")
        self.data_collator = AlphaCollator(self.data_collator)
        self._captured: list[torch.Tensor] | None = None
        modules = [self.accelerator.unwrap_model(self.model)]
        if self.ref_model is not None:
            modules.append(self.accelerator.unwrap_model(self.ref_model))
        for module in modules:
            module.register_forward_hook(self._capture_log_probs, with_kwargs=True)

    def _capture_log_probs(self, module, args, kwargs, output):
        if self._captured is not None and kwargs.get("fused_lm_head"):
            self._captured.append(output.log_probs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "alpha" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "alpha"]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation, then drop the EOS TRL appended to partial (newline-ended) steps."""
        partial = [(c.endswith("\n"), r.endswith("\n")) for c, r in zip(dataset["chosen"], dataset["rejected"],
                                                                        strict=True)]
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        eos = self._tokenizer.eos_token_id

        def strip_eos(example, index):
            for key, is_partial in zip(("chosen_ids", "rejected_ids"), partial[index], strict=True):
                if is_partial and example[key] and example[key][-1] == eos:
                    example[key] = example[key][:-1]
            return example

        return dataset.map(strip_eos, with_indices=True, desc=f"Keeping partial steps open in {dataset_name}")

    def logratio_margin(self, captured: list[torch.Tensor], inputs: dict) -> torch.Tensor:
        """h per pair, from the log-probs TRL's own forward passes produced (summed like TRL)."""
        seq_len = inputs["completion_mask"].shape[1] - 1
        policy_chosen, policy_rejected = captured[0][:, -seq_len:].sum(dim=1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = captured[1][:, -seq_len:].sum(dim=1).chunk(2)
        return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        alpha = inputs.pop("alpha", None)
        self._captured = []
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            captured = self._captured
        finally:
            self._captured = None
        if alpha is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        h = self.logratio_margin(captured, inputs)
        weight = float(self.loss_weights[0])  # TRL weighted its sigmoid loss by it: the α term too
        loss = loss + weight * (alpha.to(h.device, h.dtype) * self.beta * h).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["alpha"].append(self.accelerator.gather(alpha.to(h.device)).mean().item())
        return (loss, outputs) if return_outputs else loss


def cdpo_loss(h: torch.Tensor, alpha: torch.Tensor | float, beta: float) -> torch.Tensor:
    """The SPEC §3 formula itself, per pair (for tests and reading)."""
    logsigmoid = torch.nn.functional.logsigmoid
    return -(1 - alpha) * logsigmoid(beta * h) - alpha * logsigmoid(-beta * h)
