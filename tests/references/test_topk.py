"""The top-k reference distribution: worked by hand, and its error bounds checked on random distributions."""

from __future__ import annotations

import torch

from trl_priority.priorities.distribution import kl_to_reference
from trl_priority.references.topk import dense_logprobs, topk_of


def test_dense_by_hand_label_outside_topk():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    labels = torch.tensor([3])
    ids, logps, label_logps = topk_of(probs.log(), labels, k=2)
    assert ids.tolist() == [[0, 1]]
    rebuilt = dense_logprobs(ids, logps, label_logps, labels, vocab_size=5).exp()
    # stored: 0.5, 0.2 and the label's 0.1; the tail 0.2 is spread over the 2 other tokens
    torch.testing.assert_close(rebuilt, torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]]))


def test_dense_by_hand_label_inside_topk():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    labels = torch.tensor([1])
    ids, logps, label_logps = topk_of(probs.log(), labels, k=2)
    rebuilt = dense_logprobs(ids, logps, label_logps, labels, vocab_size=5).exp()
    # stored: 0.5 and 0.2 (the label); the tail 0.3 over the 3 others
    torch.testing.assert_close(rebuilt, torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]]))


def test_dense_by_hand_tail_shaped_like_the_policy():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    policy = torch.tensor([[0.3, 0.2, 0.1, 0.1, 0.3]])
    labels = torch.tensor([3])
    ids, logps, label_logps = topk_of(probs.log(), labels, k=2)
    rebuilt = dense_logprobs(ids, logps, label_logps, labels, 5, tail_logprobs=policy.log()).exp()
    # the tail 0.2 goes to tokens 2 and 4 as the policy shares its 0.1 : 0.3 between them
    torch.testing.assert_close(rebuilt, torch.tensor([[0.5, 0.2, 0.05, 0.1, 0.15]]))


def test_whole_vocabulary_is_exact():
    torch.manual_seed(0)
    logprobs = torch.randn(6, 11).log_softmax(-1)
    labels = torch.randint(0, 11, (6,))
    rebuilt = dense_logprobs(*topk_of(logprobs, labels, k=11), labels, vocab_size=11)
    torch.testing.assert_close(rebuilt.exp(), logprobs.exp(), atol=1e-6, rtol=0)


def test_error_bounds_on_random_distributions():
    """Spread evenly or like the policy, π̂ sums to 1, TV(π̂, π_ref) ≤ tail, and the KL anchor's gradient with respect to the policy's logits is off by
    at most 2·tail in L1 (its gradient is π_θ − π_ref)."""
    torch.manual_seed(0)
    vocab, n = 50, 64
    ref = (torch.randn(n, vocab) * 3).log_softmax(-1)
    labels = torch.randint(0, vocab, (n,))
    logits = torch.randn(n, vocab, requires_grad=True)
    for k, tail_shape in ((1, None), (4, None), (16, None), (1, logits), (4, logits), (16, logits)):
        ids, logps, label_logps = topk_of(ref, labels, k)
        shape = None if tail_shape is None else tail_shape.detach().log_softmax(-1)
        approx = dense_logprobs(ids, logps, label_logps, labels, vocab, tail_logprobs=shape)
        stored = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, ids, True).scatter_(1, labels[:, None], True)
        tail = torch.where(stored, 0.0, ref.exp()).sum(-1)  # (n,) computed independently, from the mask
        torch.testing.assert_close(approx.exp().sum(-1), torch.ones(n))
        tv = 0.5 * (approx.exp() - ref.exp()).abs().sum(-1)
        assert (tv <= tail + 1e-6).all()
        (exact_grad,) = torch.autograd.grad(kl_to_reference(logits.log_softmax(-1), labels, ref).sum(), logits)
        (approx_grad,) = torch.autograd.grad(kl_to_reference(logits.log_softmax(-1), labels, approx).sum(), logits)
        assert ((exact_grad - approx_grad).abs().sum(-1) <= 2 * tail + 1e-5).all()
        assert (tail > 0).any()  # the bound is exercised, not vacuous


def test_policy_shaped_tail_never_overstates_the_kl():
    """With the tail shaped like the policy, KL(π̂ ‖ π_θ) ≤ KL(π_ref ‖ π_θ) (the log-sum inequality on the tail), with
    equality when the policy's tail has the reference's shape."""
    torch.manual_seed(1)
    vocab, n = 40, 32
    ref = (torch.randn(n, vocab) * 2).log_softmax(-1)
    policy = (torch.randn(n, vocab) * 2).log_softmax(-1)
    labels = torch.randint(0, vocab, (n,))
    ids, logps, label_logps = topk_of(ref, labels, k=5)
    approx = dense_logprobs(ids, logps, label_logps, labels, vocab, tail_logprobs=policy)
    assert (kl_to_reference(policy, labels, approx) <= kl_to_reference(policy, labels, ref) + 1e-5).all()
    same_shape = dense_logprobs(ids, logps, label_logps, labels, vocab, tail_logprobs=ref)
    torch.testing.assert_close(kl_to_reference(policy, labels, same_shape), kl_to_reference(policy, labels, ref))
