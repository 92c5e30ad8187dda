"""ATDP: the PII spans and Φ, and DP-SGD through Opacus against a naive per-example clip-and-sum, with ε logged."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_priority import PrioritySFTTrainer
from trl_priority.priorities.privacy import _pii_spans


def test_pii_spans_found_by_hand():
    text = "Natalia sold 48 clips. She wrote to nat.g@mail.com and Omar called 555 123 4567."
    assert _pii_spans(text, {}) == [[0, 7], [36, 50], [55, 59], [67, 79]]  # Natalia, the e-mail, Omar, the number
    assert text[36:50] == "nat.g@mail.com" and text[67:79] == "555 123 4567"


def pii_dataset(n=4) -> Dataset:
    rows = [("How many apples?", "Natalia has 3 + 4 = 7 apples."), ("How many pens?", "6 * 2 = 12 pens, says Omar.")]
    rows = [rows[i % 2] for i in range(n)]
    return Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [" " + c for _, c in rows]})


def test_atdp_gives_pii_tokens_pii_budget(tokenizer, make_model, make_args):
    args = make_args(priority="atdp", priority_args={"pii_budget": 0.25})
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=pii_dataset(2), processing_class=tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    phi = trainer.token_priorities(batch)  # (B, T-1): position t scores input_ids[t + 1]
    for row in range(2):
        low = [batch["input_ids"][row, t + 1].item() for t in range(phi.shape[1]) if phi[row, t] == 0.25]
        assert tokenizer.decode(low).replace(" ", "") in ("Natalia", "Omar")
        kept = phi[row][(phi[row] != 0) & (phi[row] != 0.25)]
        assert kept.numel() > 0 and (kept == 1).all()


def naive_clipped_update(model, batch, clip, lr):
    """−lr/B · Σ_i clip(g_i): g_i the gradient of B · (example i's summed token NLL) / N, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    labels = batch["labels"][:, 1:]
    n_tokens = (labels != -100).sum()
    size = batch["input_ids"].shape[0]
    total = [torch.zeros_like(p) for p in params]
    for i in range(size):
        logits = model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        ).logits
        logps = logits[0, :-1].log_softmax(-1)
        nll = 0.0
        for t in range(labels.shape[1]):
            if labels[i, t] != -100:
                nll = nll - logps[t, labels[i, t]]
        grads = torch.autograd.grad(size * nll / n_tokens, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for acc, g in zip(total, grads):
            acc += factor * g
    return [-lr * g / size for g in total]


def test_dp_sgd_step_is_the_naive_clipped_sum_and_epsilon_is_logged(tokenizer, make_model, make_args, datasets_):
    from peft import LoraConfig

    args = make_args(
        priority="sft", differential_privacy={"noise_multiplier": 0.0, "max_grad_norm": 1e-3, "delta": 1e-5},
        optim="sgd", learning_rate=1000.0,  # large: the clipped update must stand above float32 rounding
        lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1,
        per_device_train_batch_size=4, weight_decay=0.0,
    )  # fmt: skip
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer,
        peft_config=LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False),
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    expected = naive_clipped_update(trainer.model, batch, clip=1e-3, lr=1000.0)
    trainer.optimizer.zero_grad(set_to_none=True)  # the naive pass ran through Opacus' hooks: drop its grad_sample
    trainer.train()  # one step over the one batch of 4 examples (the same 4, another order: the sum does not care)
    for p, old, update in zip(params, before, expected):
        torch.testing.assert_close(p.detach() - old, update, rtol=1e-3, atol=1e-7)
    assert sum(u.abs().sum() for u in expected) > 0

    logged = [log for log in trainer.state.log_history if "dp/epsilon" in log]
    assert logged and logged[-1]["dp/delta"] == 1e-5
    assert logged[-1]["dp/epsilon"] == float("inf")  # no noise: no privacy


def test_epsilon_grows_as_the_accountant_says(tokenizer, make_model, make_args, datasets_):
    from opacus.accountants import RDPAccountant
    from peft import LoraConfig

    args = make_args(priority="atdp", differential_privacy={"noise_multiplier": 1.1}, max_steps=2)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(8), processing_class=tokenizer,
        peft_config=LoraConfig(target_modules="all-linear", r=4),
    )  # fmt: skip
    trainer.train()
    epsilons = [log["dp/epsilon"] for log in trainer.state.log_history if "dp/epsilon" in log]
    accountant = RDPAccountant()
    expected = []
    for _ in range(2):
        accountant.step(noise_multiplier=1.1, sample_rate=2 / 8)
        expected.append(accountant.get_epsilon(1e-5))
    assert epsilons == pytest.approx(expected) and epsilons[1] > epsilons[0] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({"packing": True}, "packing"),
    ],
)
def test_unsupported_settings_are_errors(overrides, message, tokenizer, make_model, make_args, datasets_):
    args = make_args(priority="sft", differential_privacy={}, **overrides)
    with pytest.raises(ValueError, match=message):
        PrioritySFTTrainer(
            model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
        )


def test_unknown_dp_setting_fails_in_the_config(make_args):
    with pytest.raises(ValueError, match=r"Unknown `differential_privacy` setting\(s\) \['sigma'\]"):
        make_args(differential_privacy={"sigma": 1.0})
