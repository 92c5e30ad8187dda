"""Soft reweighting priorities (entropy, SelecTKD, SWiFt, SRFT) against hand-computed values and naive loops written
from the papers' equations, and on a tiny model against its full logits."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import full_logits_stats, phi_of
from trl_priority import PriorityError, PrioritySFTTrainer, get_priority


MASK = torch.tensor([[True, True, True, False]])


def log(*probs):
    return torch.tensor([probs]).log()


def random_batch(seed: int, rows: int = 4, cols: int = 9):
    """Random statistics with one fully masked row."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) > 0.25
    mask[1] = False  # a row without any supervised token
    entropy = torch.rand(rows, cols, generator=generator) * 4
    logps = torch.rand(rows, cols, generator=generator).clamp(min=1e-3).log()
    ref_logps = torch.rand(rows, cols, generator=generator).clamp(min=1e-3).log()
    return mask, entropy, logps, ref_logps


def supervised(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


# ------------------------------------------------------------------------------------------------------------------
# entropy
# ------------------------------------------------------------------------------------------------------------------
def test_entropy_power_hand_computed():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 40.0]])  # the ignored position's entropy must not enter the mean
    # alpha = 1: mean of (1, 2, 3) is 2 → Φ = H / 2
    torch.testing.assert_close(phi_of("entropy", {"entropy": entropy, "mask": MASK}), torch.tensor([[0.5, 1, 1.5, 0]]))
    # alpha = 2: H² = 1, 4, 9, mean 14/3 → Φ = 3/14, 12/14, 27/14
    phi = phi_of("entropy", {"entropy": entropy, "mask": MASK}, alpha=2.0)
    torch.testing.assert_close(phi, torch.tensor([[3 / 14, 12 / 14, 27 / 14, 0.0]]))
    # normalize=False: the raw H^alpha
    phi = phi_of("entropy", {"entropy": entropy, "mask": MASK}, alpha=0.5, normalize=False)
    torch.testing.assert_close(phi, torch.tensor([[1.0, math.sqrt(2), math.sqrt(3), 0.0]]))


def test_entropy_uniform_or_zero_entropy_gives_weight_one():
    vocab = 37
    uniform = torch.full((2, 5), math.log(vocab))  # uniform next-token logits: H = ln V everywhere
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(phi_of("entropy", {"entropy": uniform, "mask": mask}), torch.ones(2, 5))
    # every supervised token certain (H = 0): no token stands out, all get 1 (not 0/0)
    zero = torch.zeros(2, 5)
    torch.testing.assert_close(phi_of("entropy", {"entropy": zero, "mask": mask}), torch.ones(2, 5))


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5, 0.0])
def test_entropy_power_oracle_loop(alpha):
    mask, entropy, _, _ = random_batch(int(alpha * 10))
    phi = phi_of("entropy", {"entropy": entropy, "mask": mask}, alpha=alpha)
    tokens = supervised(mask)
    mean = sum(entropy[b, t].item() ** alpha for b, t in tokens) / len(tokens)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            expected = entropy[b, t].item() ** alpha / mean if mask[b, t] else 0.0
            assert phi[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), (b, t)
    # the mean weight over the supervised tokens is 1: the loss keeps SFT's scale
    assert phi[mask].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.all(phi[1] == 0)  # the fully masked row


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.05])
def test_entropy_top_oracle_loop(ratio):
    """The paper's rule: the top `ratio` of supervised tokens by entropy, here weighted 1/ratio (mean 1)."""
    mask, entropy, _, _ = random_batch(7)
    entropy[0, :3] = 2.0  # ties: earlier positions first
    phi = phi_of("entropy", {"entropy": entropy, "mask": mask}, mode="top", ratio=ratio)
    plain = phi_of("entropy", {"entropy": entropy, "mask": mask}, mode="top", ratio=ratio, normalize=False)
    tokens = supervised(mask)
    keep = max(1, math.floor(ratio * len(tokens) + 0.5))
    ranked = sorted(range(len(tokens)), key=lambda i: (-entropy[tokens[i]].item(), i))
    kept = {tokens[i] for i in ranked[:keep]}
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            assert plain[b, t].item() == float((b, t) in kept), (b, t)
            assert phi[b, t].item() == pytest.approx(1 / ratio if (b, t) in kept else 0.0), (b, t)


def test_entropy_all_masked_batch_and_step_scope_check():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    entropy = torch.rand(2, 4)
    for mode in ("power", "top"):
        assert torch.all(phi_of("entropy", {"entropy": entropy, "mask": mask}, mode=mode) == 0)
    with pytest.raises(PriorityError, match="scope='step' selects the top `ratio`"):
        get_priority("entropy").resolve_args({"scope": "step"})
    get_priority("entropy").resolve_args({"scope": "step", "mode": "top"})  # valid


def test_entropy_on_the_reference_signal_reads_the_reference_entropy():
    priority = get_priority("entropy")
    args = priority.resolve_args({"signal": "reference"})
    assert "ref_entropy" in priority.statistics_for(args) and "entropy" not in priority.statistics_for(args)
    ref = torch.tensor([[1.0, 3.0, 2.0, 9.0]])
    phi = phi_of("entropy", {"ref_entropy": ref, "entropy": torch.ones(1, 4), "mask": MASK}, signal="reference")
    torch.testing.assert_close(phi, torch.tensor([[0.5, 1.5, 1.0, 0.0]]))


# ------------------------------------------------------------------------------------------------------------------
# selectkd
# ------------------------------------------------------------------------------------------------------------------
def test_selectkd_is_the_teacher_probability_by_default_and_needs_a_trained_teacher():
    assert get_priority("selectkd").reference == "explicit"
    stats = {"logps": log(0.9, 0.9, 0.9, 0.9), "ref_logps": log(0.5, 0.05, 0.2, 0.7), "mask": MASK}
    torch.testing.assert_close(phi_of("selectkd", stats), torch.tensor([[0.5, 0.05, 0.2, 0.0]]))
    # threshold 0.1: the teacher rejects p_T = 0.05 (Φ = 0); the others keep their p_T
    torch.testing.assert_close(phi_of("selectkd", stats, threshold=0.1), torch.tensor([[0.5, 0.0, 0.2, 0.0]]))
    # the paper's hard weights {β, 1}: accepted 1, rejected β = 0.3
    phi = phi_of("selectkd", stats, threshold=0.1, rejected_weight=0.3, teacher_weight=False)
    torch.testing.assert_close(phi, torch.tensor([[1.0, 0.3, 1.0, 0.0]]))


def test_selectkd_speculative_acceptance_hand_computed():
    # p_θ = 0.5, 0.1, 0.8;  p_T = 0.25, 0.3, 0.8 → acceptance min(1, p_T/p_θ) = 0.5, 1, 1
    stats = {"logps": log(0.5, 0.1, 0.8, 0.2), "ref_logps": log(0.25, 0.3, 0.8, 0.9), "mask": MASK}
    phi = phi_of("selectkd", stats, verify="speculative", teacher_weight=False)
    torch.testing.assert_close(phi, torch.tensor([[0.5, 1.0, 1.0, 0.0]]))
    # rejected weight β = 0.2: the expected weight a + β(1 − a) = 0.5 + 0.1 = 0.6
    phi = phi_of("selectkd", stats, verify="speculative", teacher_weight=False, rejected_weight=0.2)
    torch.testing.assert_close(phi, torch.tensor([[0.6, 1.0, 1.0, 0.0]]))
    # times the teacher's probability: 0.125, 0.3, 0.8
    phi = phi_of("selectkd", stats, verify="speculative")
    torch.testing.assert_close(phi, torch.tensor([[0.125, 0.3, 0.8, 0.0]]))


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"threshold": 0.4, "rejected_weight": 0.25},
        {"threshold": 0.3, "teacher_weight": False},
        {"verify": "speculative", "rejected_weight": 0.5},
        {"verify": "speculative", "teacher_weight": False},
    ],
)
def test_selectkd_oracle_loop(args):
    mask, _, logps, ref_logps = random_batch(3)
    phi = phi_of("selectkd", {"logps": logps, "ref_logps": ref_logps, "mask": mask}, **args)
    beta, tau = args.get("rejected_weight", 0.0), args.get("threshold", 0.0)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            p, q = math.exp(logps[b, t].item()), math.exp(ref_logps[b, t].item())
            if args.get("verify") == "speculative":
                accept = min(1.0, q / p)
            else:
                accept = 1.0 if q >= tau else 0.0
            weight = accept * 1.0 + (1 - accept) * beta
            expected = (weight * q if args.get("teacher_weight", True) else weight) if mask[b, t] else 0.0
            assert phi[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), (b, t)


# ------------------------------------------------------------------------------------------------------------------
# swift
# ------------------------------------------------------------------------------------------------------------------
def test_swift_hand_computed():
    assert get_priority("swift").reference == "explicit"
    # p_θ − p_ref = 0.8, 0, −0.8 → σ = 0.6899744811, 0.5, 0.3100255189
    stats = {"logps": log(0.9, 0.4, 0.1, 0.5), "ref_logps": log(0.1, 0.4, 0.9, 0.5), "mask": MASK}
    torch.testing.assert_close(
        phi_of("swift", stats), torch.tensor([[0.6899744811, 0.5, 0.3100255189, 0.0]]), rtol=1e-6, atol=1e-7
    )


def test_swift_log_ratio_closed_form():
    # log p_θ − log p_ref = ln 2 → σ(ln 2) = 2/3; scale 2: σ(2 ln 2) = 4/5; ln(1/2): σ = 1/3
    stats = {"logps": log(0.5, 0.2, 0.3, 0.5), "ref_logps": log(0.25, 0.4, 0.3, 0.5), "mask": MASK}
    phi = phi_of("swift", stats, space="logprob")
    torch.testing.assert_close(phi, torch.tensor([[2 / 3, 1 / 3, 0.5, 0.0]]))
    phi = phi_of("swift", stats, space="logprob", scale=2.0)
    torch.testing.assert_close(phi, torch.tensor([[4 / 5, 1 / 5, 0.5, 0.0]]))


@pytest.mark.parametrize("space, scale", [("prob", 1.0), ("prob", 5.0), ("logprob", 0.5)])
def test_swift_oracle_loop(space, scale):
    mask, _, logps, ref_logps = random_batch(11)
    phi = phi_of("swift", {"logps": logps, "ref_logps": ref_logps, "mask": mask}, space=space, scale=scale)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            lp, lr = logps[b, t].item(), ref_logps[b, t].item()
            gap = lp - lr if space == "logprob" else math.exp(lp) - math.exp(lr)
            expected = 1 / (1 + math.exp(-scale * gap)) if mask[b, t] else 0.0
            assert phi[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), (b, t)


# ------------------------------------------------------------------------------------------------------------------
# srft
# ------------------------------------------------------------------------------------------------------------------
def test_srft_hand_computed():
    entropy = torch.tensor([[0.0, math.log(2), math.log(4), 50.0]])
    # per token: 0.5·exp(−H) = 0.5, 0.25, 0.125
    phi = phi_of("srft", {"entropy": entropy, "mask": MASK}, scope="token")
    torch.testing.assert_close(phi, torch.tensor([[0.5, 0.25, 0.125, 0.0]]))
    # per batch: mean H of the supervised tokens = ln 2 → every supervised token gets 0.5·1/2
    torch.testing.assert_close(phi_of("srft", {"entropy": entropy, "mask": MASK}), torch.tensor([[0.25] * 3 + [0.0]]))
    # c = 1: the bare sg(exp(−H))
    phi = phi_of("srft", {"entropy": entropy, "mask": MASK}, coefficient=1.0, scope="token")
    torch.testing.assert_close(phi, torch.tensor([[1.0, 0.5, 0.25, 0.0]]))


@pytest.mark.parametrize("scope", ["batch", "token"])
def test_srft_oracle_loop(scope):
    mask, entropy, _, _ = random_batch(5)
    phi = phi_of("srft", {"entropy": entropy, "mask": mask}, scope=scope, coefficient=0.7)
    tokens = supervised(mask)
    mean = sum(entropy[b, t].item() for b, t in tokens) / len(tokens)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            h = entropy[b, t].item() if scope == "token" else mean
            expected = 0.7 * math.exp(-h) if mask[b, t] else 0.0
            assert phi[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), (b, t)
    assert torch.all(phi[1] == 0)


def test_srft_all_masked_batch():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.all(phi_of("srft", {"entropy": torch.rand(3, 4), "mask": mask}) == 0)


# ------------------------------------------------------------------------------------------------------------------
# On a tiny model: Φ from the trainer against the model's own full logits
# ------------------------------------------------------------------------------------------------------------------
def test_entropy_and_swift_on_a_tiny_model_match_the_full_logits(make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(4)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="entropy"), train_dataset=dataset, processing_class=tokenizer
    )
    batch = dict(trainer.data_collator(list(trainer.train_dataset)))
    phi = trainer.token_priorities(batch)
    _, entropy, mask = full_logits_stats(trainer.model, batch)
    expected = torch.where(mask, entropy / entropy[mask].mean(), 0.0)
    torch.testing.assert_close(phi, expected, rtol=1e-4, atol=1e-5)

    teacher = make_model(seed=1)
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=make_args(priority="swift"),
        train_dataset=dataset,
        processing_class=tokenizer,
        ref_model=teacher,
    )
    phi = trainer.token_priorities(batch)
    logps, _, mask = full_logits_stats(trainer.model, batch)
    ref_logps, _, _ = full_logits_stats(teacher, batch)
    expected = torch.where(mask, torch.sigmoid(logps.exp() - ref_logps.exp()), 0.0)
    torch.testing.assert_close(phi, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "method, priority_args",
    [
        ("entropy", {"mode": "top", "ratio": 0.2, "scope": "step"}),  # the paper's rule over the optimizer step
        ("srft", {"signal": "reference", "scope": "token"}),  # the frozen starting model's entropy
    ],
)
def test_variants_train_on_a_tiny_model(method, priority_args, make_model, tokenizer, datasets_, make_args):
    args = make_args(priority=method, priority_args=priority_args, gradient_accumulation_steps=2)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(8), processing_class=tokenizer
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) and log["loss"] > 0 for log in logs)
    if method == "entropy":  # about a fifth of the step's tokens are kept, each with weight 5
        assert all(0.1 < log["priority/kept_fraction"] < 0.3 for log in logs)
        assert all(log["priority/mean"] == pytest.approx(1.0, abs=0.2) for log in logs)
    else:
        assert trainer.reference is not None
