"""External priorities: weights from the structure of the data."""

from __future__ import annotations

import torch

from trl_priority.priorities.external import wit


MASK = torch.tensor([[True, True, True, True, False]])
RESPONSE = torch.tensor([[0, 0, 1, 1, 1]])


def test_wit_weights_prompt_and_response():
    phi = wit(RESPONSE, MASK, prompt_weight=0.4, response_weight=0.6)
    torch.testing.assert_close(phi, torch.tensor([[0.4, 0.4, 0.6, 0.6, 0.0]]))


def test_wit_special_cases():
    # (0, 1) is completion-only instruction tuning; (1, 1) continued pre-training on every token
    assert wit(RESPONSE, MASK, prompt_weight=0.0, response_weight=1.0).tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0]]
    assert wit(RESPONSE, MASK, prompt_weight=1.0, response_weight=1.0).tolist() == MASK.float().tolist()
