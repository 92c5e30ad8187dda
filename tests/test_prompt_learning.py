"""PEFT prompt learning with a priority: prompt tuning and p-tuning prepend virtual tokens, prefix tuning adds keys and
values. The statistics stay on the caller's positions (position t scores `labels[:, t + 1]`), whatever the model runs.

The oracle is the PEFT model's own forward with full logits (no fused head, no statistics code): the logits of the
last T positions are the real tokens', the rest belong to the virtual tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

from trl_priority import PrioritySFTTrainer


NUM_VIRTUAL = 4


def _peft_config(kind: str):
    if kind == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL)
    if kind == "p_tuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL, encoder_hidden_size=32
        )
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL)


def _real_logprobs(model, batch) -> torch.Tensor:
    """log-softmax of the next-token logits at the caller's positions `(B, T-1, V)`, from the full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    length = batch["input_ids"].shape[1]
    return logits[:, -length:][:, :-1].log_softmax(-1)  # the virtual tokens' positions come first


def _label_logps(logprobs, labels) -> torch.Tensor:
    return logprobs.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)


def _eaft_phi(logprobs, k: int = 20) -> torch.Tensor:
    """EAFT's Φ from its definition: the entropy of the top-k renormalised distribution over ln k (α = 1)."""
    top = logprobs.topk(k, dim=-1).values
    top = top - top.logsumexp(-1, keepdim=True)
    return -(top.exp() * top).sum(-1) / math.log(k)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning", "prefix_tuning"])
@pytest.mark.parametrize("method", ["dft", "prift_prob", "eaft"])
def test_prompt_learning_priorities_read_the_real_positions(kind, method, make_model, make_args, tokenizer, datasets_):
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=make_args(priority=method, max_steps=2, learning_rate=1e-2),
        train_dataset=datasets_.text(4),
        processing_class=tokenizer,
        peft_config=_peft_config(kind),
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    labels = batch["labels"]
    mask = labels[:, 1:] != -100  # (B, T-1)

    policy = _real_logprobs(trainer.model, batch)  # (B, T-1, V)
    logps = torch.where(mask, _label_logps(policy, labels), 0.0)
    if method == "dft":
        expected = logps.exp() * mask  # Φ = p_θ(y_t)
    elif method == "prift_prob":
        with trainer.model.disable_adapter():  # the reference: the base model, no virtual tokens
            reference = _real_logprobs(trainer.model, batch)
        expected = _label_logps(reference, labels).exp() * mask  # Φ = q(y_t)
    else:
        expected = _eaft_phi(policy) * mask

    statistics = trainer.token_statistics(batch)
    assert statistics["phi"].shape == mask.shape
    torch.testing.assert_close(statistics["phi"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(statistics["logps"], logps, rtol=1e-4, atol=1e-5)
    # The loss on the real positions, normalised by their count
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    torch.testing.assert_close(loss.detach(), -(expected * logps).sum() / mask.sum(), rtol=1e-4, atol=1e-7)
    assert trainer._metrics["eval"]["nll"][-1] == pytest.approx(-logps[mask].mean().item(), rel=1e-4)

    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    changed = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert changed, "the prompt-learning parameters did not train"


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_with_a_kl_anchor_to_the_base_model(kind, make_model, make_args, tokenizer, datasets_):
    """ASFT's KL(π_ref ‖ π_θ) over the vocabulary: the reference (adapter off) has no virtual tokens, the policy has."""
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=make_args(priority="asft", max_steps=2),
        train_dataset=datasets_.text(4),
        processing_class=tokenizer,
        peft_config=_peft_config(kind),
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100
    policy = _real_logprobs(trainer.model, batch)
    with trainer.model.disable_adapter():
        reference = _real_logprobs(trainer.model, batch)
    kl = (reference.exp() * (reference - policy)).sum(-1)  # (B, T-1)
    expected = 0.1 * kl[mask].sum() / mask.sum()  # kl_weight = 0.1

    trainer.model.eval()
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    [name] = [name for name in trainer._metrics["eval"] if name.startswith("loss/")]
    assert trainer._metrics["eval"][name][-1] == pytest.approx(expected.item(), rel=1e-3)
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_prompt_learning_without_a_priority_reports_the_real_positions(make_model, make_args, tokenizer, datasets_):
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=make_args(),
        train_dataset=datasets_.text(4),
        processing_class=tokenizer,
        peft_config=_peft_config("prompt_tuning"),
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100
    expected = torch.where(mask, _label_logps(_real_logprobs(trainer.model, batch), batch["labels"]), 0.0)
    torch.testing.assert_close(trainer.token_statistics(batch)["logps"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_a_prompt_learning_peft_model_is_its_own_reference(kind, make_model, make_args, tokenizer, datasets_):
    """Training a `PeftModel` whose prompt was already learnt: the reference is that starting prompt (a frozen copy),
    so at step 0 PriFT-prob's Φ is the policy's own probability, virtual tokens included in its context."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(make_model(), _peft_config(kind))
    trainer = PrioritySFTTrainer(
        model=model,
        args=make_args(priority="prift_prob"),
        train_dataset=datasets_.text(4),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100
    expected = _label_logps(_real_logprobs(trainer.model, batch), batch["labels"]).exp() * mask
    with trainer.model.disable_adapter():
        base = _label_logps(_real_logprobs(trainer.model, batch), batch["labels"]).exp() * mask
    assert not torch.allclose(expected, base, atol=1e-4)  # the starting prompt changes the probabilities
    torch.testing.assert_close(trainer.token_priorities(batch), expected, rtol=1e-4, atol=1e-6)


@pytest.fixture
def unlearn_all():
    """A signed priority, Φ = −1 on every token: the loss is the bounded unlikelihood, a term computed from the
    logits inside the forward once Φ is known."""
    from trl_priority import register_priority
    from trl_priority.priorities import registry

    def unlearn_everything(mask):
        """Φ = −1"""
        return -mask.float()

    register_priority(unlearn_everything, name="unlearn_everything", regime="signed", paper="a test")
    yield "unlearn_everything"
    registry._REGISTRY.pop("unlearn_everything")


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_with_a_signed_priority(kind, unlearn_all, make_model, make_args, tokenizer, datasets_):
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=make_args(priority=unlearn_all, max_steps=2),
        train_dataset=datasets_.text(4),
        processing_class=tokenizer,
        peft_config=_peft_config(kind),
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100
    logps = _label_logps(_real_logprobs(trainer.model, batch), batch["labels"]).double()
    expected = -torch.log1p(-logps.exp())[mask].sum() / mask.sum()  # U(p) = −log(1 − p)

    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-4, atol=1e-7)
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
