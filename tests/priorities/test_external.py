"""External priorities: weights from the structure of the data."""

from __future__ import annotations

import math

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


def test_robustft_by_hand():
    from trl_priority.priorities.external import robustft

    noise = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])  # one clean, one noisy example
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    phi = robustft(noise, mask, gamma=0.5)
    e = math.exp(-1.0)  # exp(−0.5 · 2)
    torch.testing.assert_close(phi, torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [0.0, e, e, e, e]]))
    # A hard cut above max_noise: with gamma 0 the paper's keep-or-drop selection
    assert robustft(noise, mask, gamma=0.0, max_noise=1.0).tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0], [0.0] * 5]


def test_builtin_noisy_gsm8k_marks_what_it_corrupted():
    from trl_priority.tools import builtin

    clean = builtin.load_dataset("builtin:gsm8k")
    noisy = builtin.load_dataset("builtin:gsm8k-noisy")
    assert sum(noisy["noise"]) == round(0.3 * len(noisy))
    for before, after in zip(clean, noisy):
        same = before["completion"] == after["completion"]
        final = before["completion"][0]["content"].rsplit("####", 1)[-1].strip()
        changed = after["completion"][0]["content"].rsplit("####", 1)[-1].strip()
        assert same == (after["noise"] == 0.0)
        assert (changed != final) == (after["noise"] == 1.0)  # a corrupted solution ends on a wrong answer
