"""The Φ-weighted NLL and declared loss terms, added by the trainer without knowing the method."""

from __future__ import annotations

import math

import pytest
import torch

from trl_priority import LossTerm, PriorityError, PrioritySFTTrainer, register_priority
from trl_priority.objectives import weighted_nll
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
