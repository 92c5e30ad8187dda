"""Reference priorities against hand-computed values and naive loops written from the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import naive_top_fraction, phi_of
from trl_priority.priorities.reference import prift_mass, prift_prob
from trl_priority.priorities.selection import select_in_batch, select_over_step
from trl_priority.statistics import mass


# Two rows × four positions; position (0, 3) and (1, 0) are ignored
MASK = torch.tensor([[True, True, True, False], [False, True, True, True]])


def rho1_phi(logps, ref_logps, mask, ratio):
    """Φ of rho1 for one batch, as the trainer computes it with `scope="micro_batch"` (`tests.conftest.phi_of`)."""
    return phi_of("rho1", {"logps": logps, "ref_logps": ref_logps, "mask": mask}, ratio=ratio, scope="micro_batch")


def test_rho1_keeps_the_highest_excess_loss():
    # excess = ref_logps − logps = L_θ − L_ref
    logps = torch.tensor([[-3.0, -1.0, -2.0, -9.0], [-9.0, -0.5, -4.0, -1.5]])
    ref_logps = torch.tensor([[-1.0, -1.0, -1.5, 0.0], [0.0, -1.0, -1.0, -1.0]])
    # supervised excess: (0,0)=2.0 (0,1)=0.0 (0,2)=0.5 | (1,1)=-0.5 (1,2)=3.0 (1,3)=0.5; ignored ones would be 9.0
    # ratio 0.5 of 6 supervised → k = 3: (1,2)=3.0, (0,0)=2.0, then the tie 0.5 goes to the earlier (0,2)
    phi = rho1_phi(logps, ref_logps, MASK, ratio=0.5)
    assert phi.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    assert rho1_phi(logps, ref_logps, MASK, ratio=1.0).tolist() == MASK.float().tolist()
    assert rho1_phi(logps, ref_logps, MASK, ratio=0.01).tolist() == [[0.0] * 4, [0.0, 0.0, 1.0, 0.0]]  # at least 1
    assert torch.all(rho1_phi(logps, ref_logps, torch.zeros_like(MASK), ratio=0.5) == 0)


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.75])
def test_rho1_oracle_loop(ratio):
    generator = torch.Generator().manual_seed(int(ratio * 100))
    logps = -torch.rand(3, 11, generator=generator) * 5
    ref_logps = -torch.rand(3, 11, generator=generator) * 5
    logps[0, :4] = ref_logps[0, :4] + 1.0  # ties in the excess loss, so the tie-break is exercised
    mask = torch.rand(3, 11, generator=generator) > 0.25
    expected = naive_top_fraction(ref_logps - logps, mask, ratio)
    assert torch.equal(rho1_phi(logps, ref_logps, mask, ratio), expected)


def test_step_selection_over_micro_batches_equals_one_batch():
    # Scores of a batch of 4 rows, split into two micro-batches of 2 (padding differs, row-major order does not)
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 7, generator=generator)
    mask = torch.rand(4, 7, generator=generator) > 0.3
    parts = select_over_step([scores[:2, :5], scores[2:]], [mask[:2, :5], mask[2:]], 0.4)
    mask_first = mask[:2].clone()
    mask_first[:, 5:] = False  # the first micro-batch is shorter: its last columns are padding
    whole = select_in_batch(scores, torch.cat([mask_first, mask[2:]]), 0.4)
    assert torch.equal(torch.cat([torch.nn.functional.pad(parts[0], (0, 2)), parts[1]]), whole)
    assert torch.equal(whole, naive_top_fraction(scores, torch.cat([mask_first, mask[2:]]), 0.4).bool())


def test_prift_prob_is_the_reference_probability():
    ref_logps = torch.tensor([[0.5, 0.1, 0.25, 0.9], [0.3, 0.2, 0.8, 1.0]]).log()
    expected = torch.tensor([[0.5, 0.1, 0.25, 0.0], [0.0, 0.2, 0.8, 1.0]])
    torch.testing.assert_close(prift_prob(ref_logps, MASK), expected)


def test_mass_by_hand():
    # q = [0.5, 0.2, 0.2, 0.1]
    #   label 0 (the argmax): 0.2 + 0.2 + 0.1 below, + 0.5 itself = 1.0
    #   label 1 (tied with token 2): only 0.1 is strictly below, + 0.2 itself = 0.3
    #   label 3 (the least likely): nothing below, + 0.1 = 0.1
    q = torch.tensor([0.5, 0.2, 0.2, 0.1]).log().expand(3, 4)
    u = mass(q, torch.tensor([0, 1, 3]))
    torch.testing.assert_close(u, torch.tensor([1.0, 0.3, 0.1]))
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert prift_mass(u[None], mask, threshold=0.5).tolist() == [[1.0, 0.0, 0.0]]
    assert prift_mass(u[None], mask, threshold=0.29).tolist() == [[1.0, 1.0, 0.0]]


def test_mass_oracle_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 30, generator=generator) * 2
    labels = torch.randint(0, 30, (8,), generator=generator)
    u = mass(logits.log_softmax(-1), labels)
    for i in range(8):
        q = [math.exp(x) for x in logits[i].log_softmax(-1).tolist()]
        target = q[labels[i]]
        expected = sum(p for p in q if p < target) + target
        assert u[i].item() == pytest.approx(expected, rel=1e-5)


def test_prift_mass_masks_ignored_positions():
    ref_mass = torch.tensor([[0.9, 0.4, 0.5, 1.0], [1.0, 0.6, 0.49, 0.51]])
    expected = [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    assert prift_mass(ref_mass, MASK, threshold=0.5).tolist() == expected
