"""Intrinsic priorities against hand-computed values and naive loops written from the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch

from trl_priority.priorities.intrinsic import dft, eaft, profit, sft
from trl_priority.statistics import topk_entropy


MASK = torch.tensor([[True, True, True, False]])


def log(*probs):
    return torch.tensor([probs]).log()


def test_sft_is_the_mask():
    assert sft(MASK).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_dft_is_the_policy_probability():
    # p = 0.5, 0.05, 0.2 on supervised tokens → Φ = p; the ignored position gets 0 whatever its value
    phi = dft(log(0.5, 0.05, 0.2, 0.9), MASK)
    torch.testing.assert_close(phi, torch.tensor([[0.5, 0.05, 0.2, 0.0]]))


def test_dft_on_uniform_logits_is_one_over_the_vocabulary():
    vocab = 37
    logits = torch.zeros(2, 5, vocab)
    logps = logits.log_softmax(-1)[..., 0]  # any label: every token has p = 1/V
    phi = dft(logps, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(phi, torch.full((2, 5), 1 / vocab))


def test_profit_higher_keeps_strictly_more_likely_tokens():
    # p = 0.5 > 0.25 kept; p = 0.25 is not > 0.25 (strict, as in the paper); p = 0.05 dropped; ignored stays 0
    logps = log(0.5, 0.25, 0.05, 0.9)
    tau = float(logps[0, 1].exp())  # the exact float the function compares with
    assert profit(logps, MASK, tau=tau).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert profit(logps, MASK, tau=0.1).tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_profit_lower_and_middle():
    logps = log(0.5, 0.25, 0.05, 0.9)
    assert profit(logps, MASK, tau=0.3, strategy="lower").tolist() == [[0.0, 1.0, 1.0, 0.0]]
    # middle keeps 0.1 < p < 0.4: only 0.25
    assert profit(logps, MASK, tau=0.1, tau_upper=0.4, strategy="middle").tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_profit_oracle_loop():
    generator = torch.Generator().manual_seed(0)
    logps = torch.rand(4, 9, generator=generator).log()
    mask = torch.rand(4, 9, generator=generator) > 0.2
    for strategy, tau, upper in [("higher", 0.3, 0.7), ("lower", 0.3, 0.7), ("middle", 0.2, 0.6)]:
        phi = profit(logps, mask, tau=tau, strategy=strategy, tau_upper=upper)
        for b in range(4):
            for t in range(9):
                p = math.exp(logps[b, t].item())
                keep = {"higher": p > tau, "lower": p < tau, "middle": tau < p < upper}[strategy]
                assert phi[b, t].item() == float(keep and bool(mask[b, t])), (strategy, b, t)


def naive_eaft(logits: list[float], k: int, alpha: float) -> float:
    """EAFT Eq. 2-3 by hand: softmax over the k largest logits, its entropy, divided by ln k, to the power alpha."""
    top = sorted(logits, reverse=True)[:k]
    z = sum(math.exp(x - top[0]) for x in top)
    probs = [math.exp(x - top[0]) / z for x in top]
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    return (entropy / math.log(k)) ** alpha


def test_eaft_equal_top_k_logits_give_weight_one():
    # The 20 largest logits are equal: the renormalised top-20 is uniform, H = ln 20, Φ = 1 (for any alpha)
    logits = torch.cat([torch.full((20,), 3.0), torch.linspace(-5, 0, 30)])[None]
    labels = torch.tensor([0])
    entropy = topk_entropy(logits.log_softmax(-1), labels, k=20)
    torch.testing.assert_close(entropy, torch.tensor([math.log(20)]))
    for alpha in (0.5, 1.0, 3.0):
        torch.testing.assert_close(eaft(entropy[None], torch.tensor([[True]]), k=20, alpha=alpha), torch.ones(1, 1))


def test_eaft_confident_token_gets_almost_no_weight():
    logits = torch.cat([torch.tensor([30.0]), torch.zeros(49)])[None]  # one dominant token
    entropy = topk_entropy(logits.log_softmax(-1), torch.tensor([0]), k=20)
    assert eaft(entropy[None], torch.tensor([[True]]), k=20, alpha=1.0).item() < 1e-9


@pytest.mark.parametrize("k, alpha", [(20, 1.0), (5, 2.0), (3, 0.5)])
def test_eaft_oracle_loop(k, alpha):
    generator = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 50, generator=generator) * 3  # (n, V)
    labels = torch.randint(0, 50, (6,), generator=generator)
    mask = torch.tensor([True, True, False, True, True, True])
    entropy = topk_entropy(logits.log_softmax(-1), labels, k=k)
    phi = eaft(entropy[None], mask[None], k=k, alpha=alpha)[0]
    for i in range(6):
        expected = naive_eaft(logits[i].tolist(), k, alpha) if mask[i] else 0.0
        assert phi[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), i
