"""What the cDPO and V-DPO trainer tests share: a reference model that differs from the
policy (so the reference term h is not zero) and the trainer's collated batch of all rows."""

import copy

import torch


def perturbed_reference(policy, scale: float = 0.05, seed: int = 1):
    """A copy of ``policy`` with seeded Gaussian noise on every weight."""
    ref = copy.deepcopy(policy)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn_like(p))
    return ref


def batch_of(trainer):
    """The trainer's collator applied to its whole (small) training set."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
