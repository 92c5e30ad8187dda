"""The Φ-weighted NLL and declared loss terms, added by the trainer without knowing the method."""

from __future__ import annotations

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
