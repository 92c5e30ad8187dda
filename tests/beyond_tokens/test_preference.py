"""Factuality Preference / F-DPO: the loss against a naive computation from the full logits, the label flip, and
agreement with TRL's own DPO loss when Φ ≡ 1 and λ = 0."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trl_priority.beyond_tokens.preference import FactualityDPOConfig, FactualityDPOTrainer


PAIRS = [  # prompt, chosen, rejected, h_chosen, h_rejected
    ("Tom has 3 apples and buys 4 more. How many apples?", " 3 + 4 = 7 apples.", " 3 + 4 = 8 apples.", 0, 1),
    ("A box holds 6 pens. How many pens in 2 boxes?", " 6 * 2 = 13 pens.", " 6 * 2 = 12 pens.", 1, 0),  # misordered
    ("Sam had 10 cards and gave away 3. How many are left?", " 10 - 3 = 7 cards.", " 10 - 3 = 7 cards!", 0, 0),
    ("Half of 18 children play. How many play?", " 18 / 2 = 9 children.", " 18 / 2 = 8 children.", 0, 1),
]


def dataset(labels: bool = True) -> Dataset:
    columns = {"prompt": [p[0] for p in PAIRS], "chosen": [p[1] for p in PAIRS], "rejected": [p[2] for p in PAIRS]}
    if labels:
        columns |= {"chosen_hallucinated": [p[3] for p in PAIRS], "rejected_hallucinated": [p[4] for p in PAIRS]}
    return Dataset.from_dict(columns)


def config(tmp_path, cls=FactualityDPOConfig, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
        report_to="none", save_strategy="no", bf16=False, disable_tqdm=True, beta=0.5, max_length=64, logging_steps=1,
    )  # fmt: skip
    return cls(**{**defaults, **overrides})


def first_batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.data_collator(rows)


def naive_sequence_score(model, ref, prompt_ids, completion_ids, priority) -> float:
    """Σ_t Φ_t·(log π − log π_ref)(y_t) over the completion, with a loop over its tokens and full-vocabulary softmax."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
        logq = ref(input_ids=ids).logits[0].log_softmax(-1)
    total = 0.0
    for j, token in enumerate(completion_ids):
        position = len(prompt_ids) + j - 1  # the logits at position i predict token i + 1
        lp, lq = logp[position, token].item(), logq[position, token].item()
        phi = math.exp(lp) if priority == "dft" else 1.0
        total += phi * (lp - lq)
    return total


@pytest.mark.parametrize("priority, margin", [(None, 0.7), ("dft", 0.7), ("dft", 0.0)])
def test_loss_matches_the_naive_f_dpo_loss(priority, margin, tokenizer, make_model, tmp_path):
    model, ref = make_model(seed=0), make_model(seed=1)
    args = config(tmp_path, factuality_margin=margin, priority=priority)
    trainer = FactualityDPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=dataset(), processing_class=tokenizer
    )
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)

    expected = []
    for row, (_prompt, chosen, rejected, h_chosen, h_rejected) in zip(trainer.train_dataset, PAIRS):
        if h_chosen > h_rejected:  # F-DPO's flip, by hand
            chosen, rejected, h_chosen, h_rejected = rejected, chosen, h_rejected, h_chosen
        assert chosen in tokenizer.decode(row["chosen_ids"]) and rejected in tokenizer.decode(row["rejected_ids"])
        c = naive_sequence_score(model, ref, row["prompt_ids"], row["chosen_ids"], priority)
        r = naive_sequence_score(model, ref, row["prompt_ids"], row["rejected_ids"], priority)
        z = 0.5 * (c - r) - margin * (h_rejected - h_chosen)
        expected.append(-math.log(1 / (1 + math.exp(-z))))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_without_margin_or_priority_it_is_trls_dpo_loss(tokenizer, make_model, tmp_path):
    ours = FactualityDPOTrainer(
        model=make_model(seed=0), ref_model=make_model(seed=1), args=config(tmp_path, factuality_margin=0.0),
        train_dataset=dataset(labels=False), processing_class=tokenizer,
    )  # fmt: skip
    trls = DPOTrainer(
        model=make_model(seed=0), ref_model=make_model(seed=1), args=config(tmp_path, cls=DPOConfig),
        train_dataset=dataset(labels=False), processing_class=tokenizer,
    )  # fmt: skip
    batch = first_batch(ours)
    with torch.no_grad():
        a = ours.compute_loss(ours.model, batch)
        b = trls.compute_loss(trls.model, {k: v for k, v in batch.items() if k != "factuality_gap"})
    torch.testing.assert_close(a, b)


def test_trains_two_steps_with_lora_and_the_adapter_off_as_reference(tokenizer, make_model, tmp_path):
    from peft import LoraConfig

    trainer = FactualityDPOTrainer(
        model=make_model(), args=config(tmp_path, priority="dft"), train_dataset=dataset(), processing_class=tokenizer,
        peft_config=LoraConfig(target_modules="all-linear"),
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert logs[0]["fdpo/factuality_gap"] == pytest.approx(0.75)  # gaps 1, 1 (flipped), 0, 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"priority": "rho1"}, "which a DPO forward does not give"),
        ({"loss_type": "ipo"}, "leave `loss_type` at 'sigmoid'"),
        ({"factuality_margin": -1.0}, "must be ≥ 0"),
        ({"precompute_ref_log_probs": True}, "cannot weight"),
    ],
)
def test_bad_settings_are_errors(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_builtin_preference_view_pairs_each_correct_solution_with_its_wrong_one():
    from trl_priority.tools.builtin import load_dataset, load_gsm8k

    pairs, clean = load_dataset("builtin:gsm8k-preference"), load_gsm8k()
    assert len(pairs) == len(clean) == 256
    assert pairs[0]["prompt"] == clean[0]["prompt"] and pairs[0]["chosen"] == clean[0]["completion"]
    assert pairs[0]["rejected"] != pairs[0]["chosen"]
    assert set(pairs["chosen_hallucinated"]) == {0} and set(pairs["rejected_hallucinated"]) == {1}


DPO_RECIPES = sorted(
    p for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml") if "Run: trl-priority dpo" in p.read_text()
)


@pytest.mark.parametrize("recipe", DPO_RECIPES, ids=lambda path: path.stem)
def test_dpo_recipe_trains_two_steps_on_a_tiny_model(recipe, tmp_path, model_dir):
    from trl_priority.scripts import dpo

    assert recipe.read_text().startswith(f"# {recipe.stem}:")
    overrides = [
        "--model_name_or_path", model_dir(seed=0), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--max_length", "1024", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    parsed = dpo.make_parser().parse_args_and_config(["--config", str(recipe), *overrides])
    assert parsed[0].dataset_name.startswith("builtin:") and parsed[2].model_name_or_path.startswith("/")
    trainer = dpo.main(*parsed)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_dpo_command_names_a_misspelt_setting_before_launch():
    from trl_priority.tools.cli import main

    recipe = Path(__file__).parents[2] / "recipes" / "fdpo.yaml"
    with pytest.raises(SystemExit, match="unknown setting 'factuality_marjin'.*Did you mean 'factuality_margin'"):
        main(["dpo", "--config", str(recipe), "--factuality_marjin", "2"])
