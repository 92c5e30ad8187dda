"""The Φ-weighted NLL and declared loss terms, added by the trainer without knowing the method."""

from __future__ import annotations

import math

import pytest
import torch

from trl_priority import LossTerm, PriorityError, PrioritySFTTrainer, register_priority
from trl_priority.objectives import DistributionTerm, weighted_nll
from trl_priority.priorities import registry


def test_weighted_nll_by_hand():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    phi = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
    # (1·1 + 0.5·2 + 2·0.5) / 4 = 0.75
    assert weighted_nll(logps, phi, 4).item() == 0.75
    assert weighted_nll(logps, torch.zeros_like(phi), torch.tensor(0)).item() == 0.0  # finite, not 0/0


@pytest.fixture
def entropy_bonus_priority():
    """SFT plus a bonus that raises the entropy: a term that needs the gradient of a statistic."""

    def negative_entropy(entropy, priority, mask):
        return -entropy * mask

    @register_priority(
        regime="hard", paper="a test", loss_terms=(LossTerm("entropy_bonus", negative_entropy, weight="beta"),)
    )
    def sft_with_entropy_bonus(mask, *, beta: float = 0.5):
        """Φ = 1, plus beta · (−H)"""
        return mask.float()

    yield "sft_with_entropy_bonus"
    registry._REGISTRY.pop("sft_with_entropy_bonus")


def test_declared_loss_term_is_added_with_its_weight(
    entropy_bonus_priority, make_model, tokenizer, datasets_, make_args
):
    args = make_args(priority=entropy_bonus_priority, priority_args={"beta": 0.25}, per_device_train_batch_size=4)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()

    outputs = model(**batch, fused_lm_head=True)
    mask = outputs.label_mask
    expected = (-outputs.log_probs.sum() + 0.25 * -(outputs.entropy * mask).sum()) / mask.sum()
    torch.testing.assert_close(loss, expected)
    # The term's gradient flows: the LM head feels the entropy bonus, not only the NLL
    nll_only = -outputs.log_probs.sum() / mask.sum()
    grad_nll = torch.autograd.grad(nll_only, model.lm_head.weight)[0]
    assert not torch.allclose(model.lm_head.weight.grad, grad_nll)
    assert trainer._metrics["train"]["loss/entropy_bonus"][-1] == pytest.approx(
        (0.25 * -(outputs.entropy * mask).sum() / mask.sum()).item(), rel=1e-5
    )


def test_loss_terms_are_checked_at_registration():
    with pytest.raises(PriorityError, match="loss term 'x' reads unknown statistics .* or hyperparameters \\['w'\\]"):

        @register_priority(loss_terms=(LossTerm("x", lambda logps, mask: logps, weight="w"),))
        def no_weight(mask):
            return mask.float()

    assert "no_weight" not in registry._REGISTRY


def test_signed_loss_by_hand():
    from trl_priority.objectives import priority_loss

    p = torch.tensor([[0.5, 0.25, 0.9, 1.0]])
    logps = p.log()
    phi = torch.tensor([[1.0, -2.0, -0.5, 0.0]])
    # +1·(−ln 0.5) + 2·(−ln 0.75) + 0.5·(−ln 0.1), each token counted once in N = 4
    expected = (-math.log(0.5) - 2 * math.log(0.75) - 0.5 * math.log(0.1)) / 4
    assert priority_loss(logps, phi, 4).item() == pytest.approx(expected, rel=1e-6)
    # plain ascent: −Σ|Φ|·(−log p) on the negatives
    ascent = (-math.log(0.5) + 2 * math.log(0.25) + 0.5 * math.log(0.9)) / 4
    assert priority_loss(logps, phi, 4, "ascent").item() == pytest.approx(ascent, rel=1e-6)


def test_unlikelihood_is_bounded_and_its_push_vanishes():
    from trl_priority.objectives import priority_loss

    logps = torch.tensor([[-1e-9, -0.1, -5.0, -50.0]], requires_grad=True)
    phi = -torch.ones(1, 4)
    loss = priority_loss(logps, phi, 4)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0  # even at p = 1
    # d/dlogp [−log(1 − p)] = p / (1 − p): it pushes hard on a likely token and not at all on an unlikely one
    assert logps.grad[0, 3].abs() < 1e-20 and logps.grad[0, 1] > logps.grad[0, 2] > 0
    # whereas ascent keeps pushing every negative token with the same force, and is unbounded below
    logps.grad = None
    priority_loss(logps, phi, 4, "ascent").backward()
    assert torch.allclose(logps.grad, torch.full_like(logps, 0.25))


def test_loss_term_metric_is_the_step_value_under_accumulation(
    entropy_bonus_priority, make_model, tokenizer, datasets_, make_args
):
    dataset = datasets_.prompt_completion(4)
    args = make_args(
        priority=entropy_bonus_priority,
        priority_args={"beta": 0.25},
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
    )
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
    # The true value for the step, from the untrained model over all 4 examples at once
    start = make_model()
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(start, outputs=("log_probs", "entropy"))
    batch = trainer.data_collator(list(trainer.train_dataset))
    with torch.no_grad():
        outputs = start(**batch, fused_lm_head=True)
    expected = 0.25 * -(outputs.entropy * outputs.label_mask).sum() / outputs.label_mask.sum()
    trainer.train()
    logged = next(log for log in trainer.state.log_history if "loss/entropy_bonus" in log)
    assert logged["loss/entropy_bonus"] == pytest.approx(expected.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Unlearning a confident token: U from the logits, with a non-zero, bounded gradient (float64 oracle)
# ------------------------------------------------------------------------------------------------------------------
def _confident_logits(one_minus_p: float, vocab: int = 8, dtype=torch.float32) -> torch.Tensor:
    """A row of logits whose label 0 has probability 1 − `one_minus_p`, the other tokens sharing the rest equally."""
    margin = math.log((vocab - 1) * (1 - one_minus_p) / one_minus_p)
    logits = torch.zeros(1, vocab, dtype=torch.float64)
    logits[0, 0] = margin
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_minus_p", [1e-8, 1e-3, 1e-30])
def test_log1m_p_is_exact_and_its_gradient_bounded_at_a_confident_token(dtype, one_minus_p):
    from trl_priority.objectives import log1m_p

    logits = _confident_logits(one_minus_p, dtype=dtype)  # rounded to `dtype`, as a model's head would give them
    labels = torch.tensor([0])
    ours = logits.float().clone().requires_grad_()  # the pass computes in float32
    value = log1m_p(ours, labels)
    (-value).sum().backward()

    oracle = logits.double().clone().requires_grad_()  # the same (rounded) logits, in float64, from the definition
    p = oracle.softmax(-1)[0, 0]
    expected = torch.log(oracle.softmax(-1)[0, 1:].sum())  # 1 − p as the sum of the others: no cancellation
    (-expected).backward()

    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad.double(), oracle.grad, rtol=1e-5, atol=1e-9)
    # Non-zero where the push matters, and bounded: the logit gradient p·(e_y − q) has L1 norm 2p ≤ 2
    assert ours.grad[0, 0].item() == pytest.approx(p.item(), rel=1e-5) and ours.grad[0, 0] > 0.99
    assert ours.grad.abs().sum().item() == pytest.approx(2 * p.item(), rel=1e-5)


def test_unlikelihood_from_logps_never_goes_flat():
    from trl_priority.objectives import UNLIKELIHOOD_LINEAR_FROM, unlikelihood

    delta = UNLIKELIHOOD_LINEAR_FROM
    edge = math.log1p(-delta)
    logps = torch.tensor([0.0, -1e-8, edge, edge - 1e-4, -0.5], requires_grad=True)
    values = unlikelihood(logps)
    values.sum().backward()
    slope = (1 - delta) / delta
    # Beyond p = 1 − δ, the tangent: value and slope continuous at the edge, the slope never 0 (the old clamp's was)
    assert values[0].item() == pytest.approx(-math.log(delta) - slope * edge, rel=1e-5)
    assert values[2].item() == pytest.approx(-math.log(delta), rel=1e-5)
    assert logps.grad[:3].tolist() == pytest.approx([slope] * 3, rel=1e-4)
    # Below the edge: exact, d/dlog p = p / (1 − p)
    p = math.exp(-0.5)
    assert values[4].item() == pytest.approx(-math.log(1 - p), rel=1e-6)
    assert logps.grad[4].item() == pytest.approx(p / (1 - p), rel=1e-5)


@pytest.fixture
def unlearn_everything():
    """A signed method that unlearns every supervised token: Φ = −1."""

    @register_priority(regime="signed", paper="a test")
    def unlearn_all(mask):
        """Φ = −1"""
        return -mask.float()

    yield "unlearn_all"
    registry._REGISTRY.pop("unlearn_all")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_unlearns_a_confident_token_with_a_bounded_gradient(
    dtype, unlearn_everything, make_model, tokenizer, datasets_, make_args
):
    """Every position predicts the token y with p = 1 − 1e-8 (final hidden states 0, a biased head). The old U, from
    the fused head's log p, saw log p = 0.0 there and gave the confident positions a gradient of exactly 0."""
    model = make_model()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    args = make_args(priority=unlearn_everything, per_device_train_batch_size=4)
    trainer = PrioritySFTTrainer(
        model=model, args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = batch["labels"][:, 1:]
    supervised = labels[labels != -100]
    y = int(supervised.mode().values)  # the most frequent label: the confident positions
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[y] = math.log((vocab - 1) * (1 - 1e-8) / 1e-8)
        model.model.norm.weight.zero_()  # final hidden states 0: the logits are the bias at every position
    model.lm_head = head
    model.to(dtype)

    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()

    bias = head.bias.detach().double().requires_grad_()  # the rounded bias, in float64
    logprobs = bias.log_softmax(-1)  # (V,)
    # −log(1 − p_l) = −log Σ_{v≠l} p_v for each supervised label l, Φ = −1, N = the supervised tokens
    others = torch.stack([torch.logsumexp(torch.cat([logprobs[:y_], logprobs[y_ + 1 :]]), 0) for y_ in supervised])
    expected = -others.sum() / supervised.numel()
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), rel=2e-2 if dtype == torch.bfloat16 else 1e-5)
    grad = head.bias.grad.double()
    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(grad, bias.grad, rtol=rtol, atol=1e-6)
    share = (supervised == y).sum().item() / supervised.numel()
    assert grad[y].item() == pytest.approx(share, rel=rtol)  # ≈ p per confident token: non-zero
    assert grad.abs().sum().item() <= 2 + 1e-2  # each token's logit gradient has L1 norm 2p ≤ 2, averaged over N
    assert trainer._metrics["train"]["loss/unlikelihood"][-1] == pytest.approx(expected.item(), rel=rtol)


# ------------------------------------------------------------------------------------------------------------------
# A user's distribution term reads Φ and the policy's statistics
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def term_reading_phi():
    """Φ = 0.5, plus the term Φ_t · sg(p_t) · (−log π_θ(y_t)): it reads `priority` and `logps`."""

    def confident_nll(logprobs, labels, priority, logps):
        return priority * logps.exp() * -logprobs.gather(1, labels[:, None]).squeeze(1)  # (n,)

    @register_priority(regime="soft", paper="a test", loss_terms=(DistributionTerm("confident_nll", confident_nll),))
    def half_with_term(mask):
        """Φ = 0.5"""
        return 0.5 * mask.float()

    yield "half_with_term"
    registry._REGISTRY.pop("half_with_term")


def test_distribution_term_reads_priority_and_logps(term_reading_phi, make_model, tokenizer, datasets_, make_args):
    args = make_args(priority=term_reading_phi, per_device_train_batch_size=4)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))  # the old trainer: KeyError 'priority'
    loss.backward()

    # Oracle from the full logits: Σ_t [0.5·(−log p_t) + 0.5·sg(p_t)·(−log p_t)] / N
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[mask]
    expected = (0.5 * -logp + 0.5 * logp.detach().exp() * -logp).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(expected, model.lm_head.weight)[0]
    torch.testing.assert_close(model.lm_head.weight.grad, grad, rtol=1e-4, atol=1e-7)
    term = (0.5 * logp.exp() * -logp).sum() / mask.sum()
    assert trainer._metrics["train"]["loss/confident_nll"][-1] == pytest.approx(term.item(), rel=1e-5)
