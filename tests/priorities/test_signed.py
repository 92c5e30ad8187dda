"""Signed priorities (Forgetting, Forgetting with a data-given split) against hand-computed values and naive loops
written from the paper's equations, and the signed loss through the trainer, on real incorrect GSM8K solutions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from trl_priority import PriorityError, PrioritySFTTrainer, get_priority
from trl_priority.priorities.signed import forgetting, forgetting_data


# The official code's defaults (finetune.py, run_pipeline.sh)
T_MAX, T_MIN, RHO = 0.25, 1e-5, 0.7

# GSM8K with real model solutions; the shared folder sits next to the repository (../shared from its root)
REPOSITORY = Path(__file__).resolve().parents[2]
SOLUTIONS = REPOSITORY.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"


def paper_lambda(progress: float, t_max: float = T_MAX, t_min: float = T_MIN) -> float:
    """finetune.py: forgetting_scale = (t_max − t_min) · step / max_train_steps."""
    return (t_max - t_min) * progress


# ----------------------------------------------------------------------------------------------------------------
# forgetting: Φ from the selection
# ----------------------------------------------------------------------------------------------------------------
def test_forgetting_by_hand():
    selected = torch.tensor([[True, False, True, False], [False, True, False, False]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    # progress 0.5: λ = 0.24999 · 0.5 = 0.124995; negatives get −λ · 0.7 / 0.3 = −0.291655
    phi = forgetting(selected, torch.tensor(0.5), mask, ratio=0.7)
    neg = -0.124995 * 0.7 / 0.3
    expected = torch.tensor([[1.0, neg, 1.0, 0.0], [neg, 1.0, neg, 0.0]])
    torch.testing.assert_close(phi, expected)
    # Step 0: λ = 0, nothing is forgotten yet; the negatives carry no weight at all
    assert forgetting(selected, torch.tensor(0.0), mask).tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    # ratio = 1 keeps every token: no negatives, no division by zero
    assert torch.all(forgetting(mask, torch.tensor(1.0), mask, ratio=1.0) == mask.float())


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("ratio, t_max, t_min", [(RHO, T_MAX, T_MIN), (0.5, 1.0, 0.0), (0.9, 0.3, 0.3)])
def test_forgetting_oracle_loop(progress, ratio, t_max, t_min):
    generator = torch.Generator().manual_seed(int(progress * 10 + ratio * 100))
    selected = torch.rand(3, 9, generator=generator) > 0.4
    mask = torch.rand(3, 9, generator=generator) > 0.2
    phi = forgetting(selected, torch.tensor(progress), mask, ratio=ratio, t_max=t_max, t_min=t_min)
    lam = paper_lambda(progress, t_max, t_min)
    for b in range(3):
        for t in range(9):
            if not mask[b, t]:
                expected = 0.0
            elif selected[b, t]:
                expected = 1.0
            else:
                expected = -lam * ratio / (1 - ratio)
            assert phi[b, t].item() == pytest.approx(expected, rel=1e-6, abs=1e-12), (b, t)


def test_forgetting_loss_is_ratio_times_the_papers_two_means():
    """With U = log p (ascent), [Σ_P NLL − λρ/(1−ρ) Σ_Q NLL] / N equals ρ · (mean_P NLL − λ mean_Q NLL)."""
    nll = [0.3, 2.0, 1.1, 0.7, 4.0, 0.2, 1.5, 0.9, 3.0, 0.4]  # 10 tokens, the first 7 positive (ρ = 0.7)
    positive, negative = nll[:7], nll[7:]
    lam = paper_lambda(0.6)
    paper = sum(positive) / 7 - lam * sum(negative) / 3
    selected = torch.tensor([[True] * 7 + [False] * 3])
    phi = forgetting(selected, torch.tensor(0.6), torch.ones(1, 10, dtype=torch.bool), ratio=RHO)[0].tolist()
    # Σ_{Φ≥0} Φ·NLL + Σ_{Φ<0} |Φ|·log p, and |Φ|·log p = Φ·NLL when Φ < 0
    ours = sum(w * x for w, x in zip(phi, nll)) / 10
    assert ours == pytest.approx(RHO * paper, rel=1e-6)


def test_forgetting_declares_a_trained_reference_and_a_step_selection():
    method = get_priority("forgetting")
    assert method.signed and method.reference == "explicit" and method.source == "reference"
    assert method.resolve_args({}) == {"ratio": 0.7, "t_max": 0.25, "t_min": 1e-5, "scope": "step"}
    with pytest.raises(PriorityError, match="t_min"):
        method.resolve_args({"t_min": 0.5, "t_max": 0.1})


@pytest.mark.parametrize("progress_step", [0, 4, 10])
def test_forgetting_through_the_trainer_matches_a_full_logits_oracle(
    progress_step, label_logps, make_model, priority_trainer
):
    """Φ from the trainer against a naive split written from token_partitioning.py: every supervised token of the
    batch ranked by loss_base − loss_ref, the top round(ρ·n) positive, the rest −λ·ρ/(1−ρ)."""
    trainer = priority_trainer("forgetting", ref_model=make_model(seed=1), max_steps=10)
    trainer.state.max_steps, trainer.state.global_step = 10, progress_step  # progress = step / 10
    batch = trainer.data_collator(list(trainer.train_dataset))
    phi = trainer.token_priorities(batch)

    logps = label_logps(trainer.model, batch)
    ref_logps = label_logps(trainer.reference.model, batch)
    mask = batch["labels"][:, 1:] != -100
    tokens = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    gap = {bt: (-logps[bt].item()) - (-ref_logps[bt].item()) for bt in tokens}  # loss_base − loss_ref
    ranked = sorted(tokens, key=lambda bt: -gap[bt])  # descending; Python's sort keeps position order on ties
    k = int(RHO * len(tokens) + 0.5)
    lam = paper_lambda(progress_step / 10)
    expected = torch.zeros_like(phi)
    for i, bt in enumerate(ranked):
        expected[bt] = 1.0 if i < k else -lam * RHO / (1 - RHO)
    torch.testing.assert_close(phi, expected)
    assert (phi < 0).any() == (progress_step > 0)


def test_forgetting_trains_with_a_step_wide_split_and_a_growing_lambda(make_model, priority_trainer):
    trainer = priority_trainer(
        "forgetting",
        ref_model=make_model(seed=1),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) for log in logs)
    # Step 0: λ = 0, the negatives carry no weight; then 1 − ρ of the tokens are unlearned (Φ < 0)
    assert logs[0]["priority/negative_fraction"] == 0.0
    for log in logs[1:]:
        assert log["priority/negative_fraction"] == pytest.approx(1 - RHO, abs=0.1)
        assert log["priority/kept_fraction"] == pytest.approx(RHO, abs=0.1)


def test_forgetting_needs_a_trained_reference(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="reference trained for the purpose"):
        PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority="forgetting"),
            train_dataset=datasets_.prompt_completion(4),
            processing_class=tokenizer,
        )


# ----------------------------------------------------------------------------------------------------------------
# forgetting_data: the split from the `unlearn` column
# ----------------------------------------------------------------------------------------------------------------
def test_forgetting_data_by_hand():
    unlearn = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    # linear, progress 0.6, weight 2: λ = 0.24999 · 0.6 = 0.149994, Φ = −0.299988 on tokens to unlearn
    phi = forgetting_data(unlearn, torch.tensor(0.6), mask, weight=2.0)
    expected = torch.tensor([[1.0, 1.0, -0.299988, 0.0], [0.0, -0.299988, -0.299988, 1.0]])
    torch.testing.assert_close(phi, expected)
    # constant: λ = t_max whatever the progress
    for progress in (0.0, 0.3, 1.0):
        phi = forgetting_data(unlearn, torch.tensor(progress), mask, schedule="constant", t_max=0.5, weight=3.0)
        expected = torch.tensor([[1.0, 1.0, -1.5, 0.0], [0.0, -1.5, -1.5, 1.0]])
        torch.testing.assert_close(phi, expected)


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.8, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_forgetting_data_oracle_loop(progress, schedule):
    generator = torch.Generator().manual_seed(int(progress * 100))
    unlearn = (torch.rand(4, 8, generator=generator) > 0.5).float()
    mask = torch.rand(4, 8, generator=generator) > 0.25
    weight, t_max, t_min = 1.7, 0.4, 0.05
    phi = forgetting_data(
        unlearn, torch.tensor(progress), mask, weight=weight, schedule=schedule, t_max=t_max, t_min=t_min
    )
    lam = (t_max - t_min) * progress if schedule == "linear" else t_max
    for b in range(4):
        for t in range(8):
            if not mask[b, t]:
                expected = 0.0
            elif unlearn[b, t] == 1:
                expected = -lam * weight
            else:
                expected = 1.0
            assert phi[b, t].item() == pytest.approx(expected, rel=1e-6, abs=1e-12), (b, t)


def test_forgetting_data_reads_the_column_and_no_reference():
    method = get_priority("forgetting_data")
    assert method.signed and method.source == "external" and not method.needs_reference
    assert method.statistics_from("data") == ("unlearn",)
    assert method.resolve_args({}) == {"weight": 1.0, "schedule": "linear", "t_max": 0.25, "t_min": 1e-5}
    with pytest.raises(PriorityError, match="t_min"):
        method.resolve_args({"t_min": 1.0})


def unlearn_dataset(datasets_, flags) -> Dataset:
    return datasets_.prompt_completion(len(flags)).add_column("unlearn", list(flags))


def test_forgetting_data_missing_column_names_the_fix(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="'unlearn'.*1 for an example whose completion is to be unlearned"):
        PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority="forgetting_data"),
            train_dataset=datasets_.prompt_completion(4),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("negative_loss", ["unlikelihood", "ascent"])
def test_forgetting_data_loss_matches_a_full_logits_oracle(
    negative_loss, label_logps, make_model, tokenizer, datasets_, make_args
):
    """The trainer's loss on one batch against [Σ_{Φ≥0} Φ·NLL + Σ_{Φ<0} |Φ|·U(p)] / N from the full logits."""
    args = make_args(
        priority="forgetting_data",
        priority_args={"schedule": "constant", "t_max": 0.5, "weight": 2.0},
        negative_loss=negative_loss,
    )
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=unlearn_dataset(datasets_, [0, 1, 0, 1]),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    phi = trainer.token_priorities(batch)
    logps = label_logps(trainer.model, batch)
    mask = batch["labels"][:, 1:] != -100
    assert (phi < 0).any() and (phi > 0).any()
    assert set(phi[mask].tolist()) == {1.0, -1.0}  # Φ = −λ·weight = −0.5 · 2 on the unlearned examples

    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            count += 1
            w, log_p = phi[b, t].item(), logps[b, t].item()
            if w >= 0:
                total += w * -log_p
            elif negative_loss == "unlikelihood":
                total += -w * -math.log(1 - math.exp(log_p))
            else:
                total += -w * log_p
    expected = total / count

    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The bound matters: many negatives, real incorrect solutions
# ----------------------------------------------------------------------------------------------------------------
def gsm8k_contrast(num_train: int = 8, num_held_out: int = 4):
    """Questions whose `6b_finetuning` solution is wrong: (train rows, held-out rows).

    Train: each question twice, once with its ground-truth solution (unlearn = 0), once with the model's incorrect
    solution (unlearn = 1). Held out: the ground truths of other questions, never trained on.
    """
    if not SOLUTIONS.is_file():
        pytest.skip(f"{SOLUTIONS} is absent (the shared GSM8K folder next to the repository)")
    rows = []
    with SOLUTIONS.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if not row["6b_finetuning"]["is_correct"]:
                rows.append(row)
            if len(rows) == num_train + num_held_out:
                break

    def prompt(row):  # the question's last sentence: the byte-level test tokenizer spends a token per character
        return "Q: " + row["question"].rstrip().rsplit(". ", 1)[-1] + "\nA: "

    train = [(prompt(r), r["ground_truth"], 0) for r in rows[:num_train]]
    train += [(prompt(r), r["6b_finetuning"]["solution"], 1) for r in rows[:num_train]]
    held_out = [(prompt(r), r["ground_truth"]) for r in rows[num_train:]]
    return train, held_out


def held_out_nll(model, tokenizer, held_out, max_length: int = 128) -> float:
    """Mean NLL per completion token of the held-out solutions, from the model's full logits, in one forward."""
    rows, starts = [], []
    for prompt, completion in held_out:
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows.append((prompt_ids + tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id])[:max_length])
        starts.append(len(prompt_ids))
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in rows])  # (B, T)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows])  # (B, T)
    model.eval()
    with torch.no_grad():
        logps = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].log_softmax(-1)
    total, count = 0.0, 0
    for b, (ids, start) in enumerate(zip(rows, starts)):
        for t in range(start - 1, len(ids) - 1):  # position t scores token t + 1: every completion token
            total -= logps[b, t, ids[t + 1]].item()
            count += 1
    return total / count


def train_on_wrong_solutions(model, tokenizer, make_args, negative_loss: str, t_max: float, steps: int = 16):
    train, _ = gsm8k_contrast()
    dataset = Dataset.from_dict(
        {"prompt": [p for p, _, _ in train], "completion": [c for _, c, _ in train], "unlearn": [u for *_, u in train]}
    )
    args = make_args(
        priority="forgetting_data",
        priority_args={"schedule": "constant", "t_max": t_max},
        negative_loss=negative_loss,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_length=128,
    )
    trainer = PrioritySFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer.model, [log for log in trainer.state.log_history if "loss" in log]


def test_many_negatives_with_unlikelihood_stay_bounded_and_gradient_ascent_does_not(make_model, tokenizer, make_args):
    """Half the training examples are real incorrect solutions to unlearn, with a large constant λ = 4 (16 times the
    paper's final λ, to stress the bound).

    Unlikelihood (the default) keeps the loss bounded below by 0 and the held-out correct solutions (other questions,
    never trained on) get no less likely; plain gradient ascent (the paper's U) drives the loss far below 0 and
    makes the held-out correct solutions less likely."""
    _, held_out = gsm8k_contrast()
    before = held_out_nll(make_model(), tokenizer, held_out)

    model, logs = train_on_wrong_solutions(make_model(), tokenizer, make_args, "unlikelihood", t_max=4.0)
    losses = [log["loss"] for log in logs]
    assert len(losses) == 16 and all(math.isfinite(loss) for loss in losses)
    assert min(losses) >= 0  # every term is ≥ 0: NLL on the positives, −log(1 − p) on the negatives
    assert max(log["priority/negative_fraction"] for log in logs) > 0.5  # many negatives
    after = held_out_nll(model, tokenizer, held_out)
    assert after <= before + 0.05, f"unlikelihood: held-out NLL {before:.3f} -> {after:.3f}"

    # Half as many steps of gradient ascent already undo more than the positives teach
    model, logs = train_on_wrong_solutions(make_model(), tokenizer, make_args, "ascent", t_max=4.0, steps=8)
    losses = [log["loss"] for log in logs]
    assert min(losses) < -5.0, losses  # the unbounded term dominates the objective
    ascent_after = held_out_nll(model, tokenizer, held_out)
    assert ascent_after > before + 0.2, f"ascent: held-out NLL {before:.3f} -> {ascent_after:.3f}"
