"""Generation helpers: the final-answer stop and generated-token counting."""

from types import SimpleNamespace

import pytest
import torch

from closedloop.generation import FINAL_ANSWER, generated_lengths


@pytest.mark.parametrize("text,stop", [
    ("3 + 4 = 7.\nThe answer is 7.", True),
    ("The answer is 12.\nMore", True),
    ("The answer is $1,234. ", True),
    ("The answer is 7", False),  # the number may go on
    ("The answer is 7.5", False),  # a decimal, not the end of the sentence
    ("The answer is unclear.", False),
])
def test_final_answer_stop(text, stop):
    assert bool(FINAL_ANSWER.search(text)) is stop


def test_generated_lengths_stop_at_eos_and_skip_padding():
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    new = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [5, 0, 0, 0, 0], [2, 2, 2, 2, 2]])
    assert generated_lengths(new, tok).tolist() == [3, 5, 1, 1]
    same = SimpleNamespace(eos_token_id=2, pad_token_id=2)  # pad = eos, as SmolLM2
    assert generated_lengths(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), same).tolist() == [2, 4]
