"""Critical tokens (cDPO's contrastive estimation) and T-SHIRT's informative tokens: the offline scores against loops
over the models' full logits written from the official code, the priorities against hand-computed values and the
official selection rule, the cDPO gradient against a transcription of its loss, and both through the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, load_dataset

from trl_priority import PrioritySFTTrainer, get_priority
from trl_priority.objectives import priority_loss
from trl_priority.priorities.contrastive import critical
from trl_priority.selection import select_in_batch
from trl_priority.token_scores import contrastive_token_scores, information_gain, main


def chat_ids(tokenizer, example) -> tuple[list[int], int]:
    """(input_ids, prompt length) of a conversational prompt-completion row, straight from the chat template."""
    ids = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids[: len(prompt)] == prompt
    return ids, len(prompt)


def with_unlearn(dataset: Dataset) -> Dataset:
    return dataset.add_column("unlearn", [float(i % 2) for i in range(len(dataset))])


def phi_of(name, statistics, args=None):
    """Φ as the trainer computes it: the method's selection over this batch first."""
    priority = get_priority(name)
    args = priority.resolve_args(args or {})
    if priority.selection is not None:
        scores = priority.selection.scores(statistics, args)
        statistics["selected"] = select_in_batch(scores, statistics["mask"], priority.selection.kept_fraction(args, 0))
    return priority(statistics, args)


# ----------------------------------------------------------------------------------------------------------------
# critical
# ----------------------------------------------------------------------------------------------------------------
def test_critical_by_hand():
    score = torch.tensor([[0.9, 0.2, 0.5], [0.9, 0.2, 0.5]])
    unlearn = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # a correct and an incorrect solution
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # only_neg (the official default): the correct solution learns every token with weight 1; the incorrect one
    # unlearns each token by 1 − s: the critical token (s = 0.2) hardest
    expected = torch.tensor([[1.0, 1.0, 0.0], [-0.1, -0.8, -0.5]])
    torch.testing.assert_close(critical(score, unlearn, mask), expected)
    # only_neg = False: the correct solution's tokens are weighted by s
    phi = critical(score, unlearn, mask, only_neg=False, rejected_weight=0.5)
    torch.testing.assert_close(phi, torch.tensor([[0.9, 0.2, 0.0], [-0.05, -0.4, -0.25]]))
    # rejected_weight = 0: the incorrect solutions are dropped
    assert critical(score, unlearn, mask, rejected_weight=0.0)[1].abs().sum() == 0
    # scores outside [0, 1] are clamped
    assert critical(torch.tensor([[1.5, -0.5]]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)).tolist() == [
        [0.0, -1.0]
    ]


def official_cdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_w, rejected_w, beta, only_neg):
    """train_cdpo.py `dpo_loss` (L118-164) and `losses.mean()` (L242), transcribed: per-position logsigmoid over the
    per-token log-ratios (already 0 where masked, as `get_batch_logps` returns them)."""
    if only_neg:
        chosen_logratio = policy_chosen - ref_chosen
    else:
        chosen_logratio = chosen_w * (policy_chosen - ref_chosen)
    rejected_logratio = rejected_w * (policy_rejected - ref_rejected)
    logits = chosen_logratio - rejected_logratio
    return (-F.logsigmoid(beta * logits)).mean()


@pytest.mark.parametrize("only_neg", [True, False])
def test_critical_gradient_is_cdpos_at_its_start(only_neg):
    """At cDPO's start (policy = reference) its gradient on each token's log-probability is −(β/2)·w⁺ on chosen
    tokens and +(β/2)·w⁻ on rejected ones: the trainer's loss with Φ from `critical` and gradient ascent on the
    negatives has the same gradient, up to the constant (β/2)·N / (B·(T−1))."""
    generator = torch.Generator().manual_seed(0)
    B, T, beta = 3, 6, 0.1
    mask = torch.rand(2 * B, T, generator=generator) > 0.25  # chosen rows, then rejected rows
    score = torch.rand(2 * B, T, generator=generator)
    reference = torch.rand(2 * B, T, generator=generator).clamp(min=0.05).log() * mask
    chosen_mask, rejected_mask = mask[:B], mask[B:]

    policy = reference.clone().requires_grad_()
    official = official_cdpo_loss(
        policy[:B] * chosen_mask,
        policy[B:] * rejected_mask,
        reference[:B],
        reference[B:],
        score[:B],
        1 - score[B:],  # rejected weights: 1 − ce_prob (L138-139)
        beta,
        only_neg,
    )
    (official_grad,) = torch.autograd.grad(official, policy)

    unlearn = torch.cat([torch.zeros(B, T), torch.ones(B, T)])
    phi = critical(score, unlearn, mask, only_neg=only_neg)
    ours_policy = reference.clone().requires_grad_()
    ours = priority_loss(ours_policy * mask, phi, int(mask.sum()), negative_loss="ascent")
    (ours_grad,) = torch.autograd.grad(ours, ours_policy)

    factor = (beta / 2) * int(mask.sum()) / (B * T)
    torch.testing.assert_close(official_grad, factor * ours_grad)
    assert (official_grad[:B][chosen_mask] < 0).all() or not only_neg  # chosen tokens are pushed up


@pytest.mark.parametrize("kind", ["conversational", "standard"])
def test_contrastive_scores_match_the_official_formula_on_full_logits(kind, make_model, tokenizer, datasets_):
    dataset = (
        datasets_.conversational_prompt_completion(3) if kind == "conversational" else datasets_.prompt_completion(3)
    )
    positive, negative = make_model(seed=1), make_model(seed=2)
    scored = contrastive_token_scores(positive, negative, dataset, tokenizer, batch_size=2)  # padded batches
    for example in scored:
        if kind == "conversational":
            ids, _ = chat_ids(tokenizer, example)
        else:  # TRL appends EOS to the completion and tokenizes prompt + completion
            ids = tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"]
        assert len(example["contrastive_score"]) == len(ids) and example["contrastive_score"][0] == 0.0
        with torch.no_grad():
            pos_logits = positive(torch.tensor([ids])).logits[0]  # (L, V), one example, no padding
            neg_logits = negative(torch.tensor([ids])).logits[0]
        for i in range(1, len(ids)):  # pipeline.py L228-233, token by token
            cd_probs = ((1 + 1) * pos_logits[i - 1] - 1 * neg_logits[i - 1]).softmax(-1)
            assert example["contrastive_score"][i] == pytest.approx(cd_probs[ids[i]].item(), rel=1e-4, abs=1e-6)


def test_critical_through_the_trainer_reads_the_column(make_model, tokenizer, datasets_, make_args):
    raw = with_unlearn(datasets_.conversational_prompt_completion(4))
    scored = contrastive_token_scores(make_model(seed=1), make_model(seed=2), raw, tokenizer)
    args = make_args(
        priority="critical",
        priority_args={"only_neg": False},
        per_device_train_batch_size=4,
        max_steps=1,
        max_length=256,
        shuffle_dataset=False,
    )
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=scored, processing_class=tokenizer)
    batch = trainer.data_collator(list(trainer.train_dataset))
    phi = trainer.token_priorities(batch)
    labels = batch["labels"]
    for row, example in enumerate(scored):
        for t in range(labels.shape[1] - 1):
            if labels[row, t + 1] == -100:
                expected = 0.0
            elif example["unlearn"]:
                expected = -(1 - example["contrastive_score"][t + 1])
            else:
                expected = example["contrastive_score"][t + 1]
            assert phi[row, t].item() == pytest.approx(expected, abs=1e-6), (row, t)
    assert (phi[1] < 0).any() and (phi[0] > 0).any()
    trainer.train()
    assert trainer.state.log_history[0]["priority/negative_fraction"] > 0


def test_critical_without_its_column_names_the_function(make_model, tokenizer, datasets_, make_args):
    raw = with_unlearn(datasets_.conversational_prompt_completion(2))
    with pytest.raises(ValueError, match="contrastive_score.*token_scores.contrastive_token_scores"):
        PrioritySFTTrainer(
            model=make_model(), args=make_args(priority="critical"), train_dataset=raw, processing_class=tokenizer
        )


# ----------------------------------------------------------------------------------------------------------------
# tshirt
# ----------------------------------------------------------------------------------------------------------------
def official_token_mask(pmi: np.ndarray, ratio: float) -> np.ndarray:
    """compute_stat.py L61 and L69: |pmi| above the (1 − ratio) percentile of every token's |pmi|."""
    threshold = np.percentile(np.abs(pmi), (1 - ratio) * 100)
    return np.abs(pmi) > threshold


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tshirt_keeps_what_the_official_percentile_keeps(ratio, sign):
    generator = torch.Generator().manual_seed(int(ratio * 100))
    gain = torch.randn(3, 8, generator=generator)  # distinct values
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :6], mask[1, 2:], mask[2, :4] = True, True, True  # 16 supervised tokens: ratio · 16 is whole
    phi = phi_of("tshirt", {"information_gain": sign * gain * mask, "mask": mask}, {"ratio": ratio})
    # the official code's pmi is −Δ; its mask is sign-free
    keep = official_token_mask(-gain[mask].numpy(), ratio)
    expected = torch.zeros(3, 8)
    expected[mask] = torch.tensor(keep, dtype=torch.float32)
    assert torch.equal(phi, expected)
    assert phi.sum() == ratio * 16


def test_tshirt_by_hand():
    gain = torch.tensor([[0.1, -2.0, 0.3, 5.0], [-0.2, 1.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])  # 9.0 is not supervised
    # |Δ| of the 7 supervised tokens: 0.1 2.0 0.3 5.0 0.2 1.0 0.0; ratio 0.5 keeps round(3.5) = 4: 5.0 2.0 1.0 0.3
    phi = phi_of("tshirt", {"information_gain": gain, "mask": mask})
    assert phi.tolist() == [[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]


def token_losses(model, ids: list[int]) -> torch.Tensor:
    """token_loss.py `compute_token_losses`: per-token cross-entropy of ids[1:], from the full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # (L-1, V)
    return torch.nn.CrossEntropyLoss(reduction="none")(logits, torch.tensor(ids[1:]))


@pytest.mark.parametrize("prefix", [None, []])
def test_information_gain_matches_the_official_losses_on_full_logits(prefix, make_model, tokenizer, datasets_):
    dataset = datasets_.conversational_prompt_completion(3)
    model = make_model(seed=0)
    scored = information_gain(model, dataset, tokenizer, batch_size=2, prefix=prefix)
    for example in scored:
        ids, prompt_len = chat_ids(tokenizer, example)
        response = ids[prompt_len:]
        start = [tokenizer.bos_token_id] if prefix is None else []
        cond = token_losses(model, ids)[prompt_len - 1 :]  # CE(y_i | x, y_<i), every response token
        uncond = token_losses(model, start + response)  # CE(y_i | y_<i), the response alone
        offset = 0 if start else 1  # token_loss.py L95: without BOS the first response token has no score
        gain = uncond - cond[offset:]  # Δ = −pmi (token_loss.py L137)
        column = example["information_gain"]
        assert len(column) == len(ids)
        assert column[:prompt_len] == [0.0] * prompt_len
        if not start:
            assert column[prompt_len] == 0.0
        assert column[prompt_len + offset :] == pytest.approx(gain.tolist(), rel=1e-4, abs=1e-5)


def test_tshirt_through_the_trainer_reads_the_column(make_model, tokenizer, datasets_, make_args):
    scored = information_gain(make_model(seed=0), datasets_.conversational_prompt_completion(4), tokenizer)
    args = make_args(
        priority="tshirt", per_device_train_batch_size=4, max_steps=1, max_length=256, shuffle_dataset=False
    )
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=scored, processing_class=tokenizer)
    batch = trainer.data_collator(list(trainer.train_dataset))
    phi = trainer.token_priorities(batch)
    # the supervised tokens of the batch, ranked by |Δ| read from the scored dataset itself
    labels = batch["labels"]
    tokens = [
        (abs(example["information_gain"][t + 1]), row, t)
        for row, example in enumerate(scored)
        for t in range(labels.shape[1] - 1)
        if labels[row, t + 1] != -100
    ]
    k = int(0.5 * len(tokens) + 0.5)
    kept = {(row, t) for _, row, t in sorted(tokens, key=lambda item: -item[0])[:k]}
    expected = torch.zeros_like(phi)
    for row, t in kept:
        expected[row, t] = 1.0
    assert torch.equal(phi, expected)
    trainer.train()
    assert trainer.state.log_history[0]["priority/kept_fraction"] == pytest.approx(0.5, abs=0.01)


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------
def test_token_scores_command_line_writes_a_dataset_the_trainer_reads(tmp_path, model_dir, datasets_):
    source = tmp_path / "source"
    source.mkdir()
    with_unlearn(datasets_.conversational_prompt_completion(2)).to_json(source / "train.jsonl")
    first, second = model_dir(seed=1), model_dir(seed=2)
    data = ["--dataset", str(source)]
    gain = main(["information-gain", "--model", first, *data, "--output", str(tmp_path / "g")])
    contrast = main(["contrastive", "--positive", first, "--negative", second, *data, "--output", str(tmp_path / "c")])
    gain_rows = load_dataset(str(gain.parent), split="train")
    contrast_rows = load_dataset(str(contrast.parent), split="train")
    assert gain_rows.column_names == ["prompt", "completion", "unlearn", "information_gain"]
    assert contrast_rows.column_names == ["prompt", "completion", "unlearn", "contrastive_score"]
    assert [len(v) for v in gain_rows["information_gain"]] == [len(v) for v in contrast_rows["contrastive_score"]]


def test_builtin_wrong_solutions_are_the_incorrect_half_of_the_contrast_set():
    from trl_priority import builtin

    wrong = builtin.load_gsm8k_wrong(limit=4)
    contrast = builtin.load_gsm8k_contrast(limit=4)
    assert wrong.column_names == ["prompt", "completion"] and len(wrong) == 4
    assert wrong["completion"] == [row["completion"] for row in contrast if row["unlearn"] == 1]
    correct = builtin.load_gsm8k(limit=4)
    assert all(w != c for w, c in zip(wrong["completion"], correct["completion"]))
