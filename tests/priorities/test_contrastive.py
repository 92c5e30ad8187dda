"""Critical tokens (cDPO's contrastive estimation), critical tokens by counterfactual impact (the position paper's
Table 1) and T-SHIRT's informative tokens: the offline scores against loops over the models' full logits written from
the official code (the counterfactual impact against deleting each token and re-scoring, one plain forward at a time),
the priorities against hand-computed values and the official selection rule, the cDPO gradient against a transcription
of its loss, and all through the trainer (the counterfactual also under padding-free and packing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, load_dataset

from tests.conftest import phi_of
from trl_priority import PriorityError, PrioritySFTTrainer, get_priority
from trl_priority.objectives import priority_loss
from trl_priority.priorities.contrastive import critical, critical_counterfactual
from trl_priority.tools.token_scores import contrastive_token_scores, counterfactual_impact, information_gain, main


def chat_ids(tokenizer, example) -> tuple[list[int], int]:
    """(input_ids, prompt length) of a conversational prompt-completion row, straight from the chat template."""
    ids = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids[: len(prompt)] == prompt
    return ids, len(prompt)


def with_unlearn(dataset: Dataset) -> Dataset:
    return dataset.add_column("unlearn", [float(i % 2) for i in range(len(dataset))])


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
# critical_counterfactual
# ----------------------------------------------------------------------------------------------------------------
def naive_rest_nll(model, ids: list[int], positions: list[int]) -> float:
    """−Σ log p(ids[s] | ids[:s]) over `positions`, from one plain forward of `ids` alone (no padding, no batch)."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (L, V)
    return -sum(logprobs[s - 1, ids[s]].item() for s in positions)


def naive_impacts(model, ids: list[int], completion: list[int], reduction: str) -> list[float]:
    """The definition, one token at a time: delete token t, re-score every other completion token (those before t
    too) in the shorter sequence, subtract their NLL in the full one."""
    impacts = [0.0] * len(ids)
    for t in completion:
        others = [s for s in completion if s != t]
        if t == 0 or not others:
            continue
        deleted = ids[:t] + ids[t + 1 :]
        moved = [s if s < t else s - 1 for s in others]  # where the other tokens stand without token t
        impact = naive_rest_nll(model, deleted, moved) - naive_rest_nll(model, ids, others)
        impacts[t] = impact / len(others) if reduction == "mean" else impact
    return impacts


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_counterfactual_impact_matches_deleting_each_token(reduction, make_model, tokenizer, datasets_):
    dataset = datasets_.conversational_prompt_completion(3)
    model = make_model(seed=3)
    scored = counterfactual_impact(model, dataset, tokenizer, reduction=reduction, batch_size=3)  # mixed, padded
    nonzero = 0
    for example in scored:
        ids, prompt_len = chat_ids(tokenizer, example)
        expected = naive_impacts(model, ids, list(range(prompt_len, len(ids))), reduction)
        column = example["counterfactual_impact"]
        assert len(column) == len(ids)
        assert column == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert column[:prompt_len] == [0.0] * prompt_len and column[-1] == 0.0  # the prompt, the last token
        nonzero += sum(abs(v) > 1e-3 for v in column)
    assert nonzero > 10  # the model's impacts are not all 0


def test_counterfactual_impact_on_a_split_completion(make_model, tokenizer):
    """A tokenized row whose completion has two stretches (a multi-turn conversation with assistant-only loss): the
    tokens between them stay in the context and are not scored."""
    ids = [[5, 9, 14, 7, 30, 31, 8, 12, 40, 6], [3, 11, 21, 22, 23]]
    completion_mask = [[0, 0, 1, 1, 0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1]]
    dataset = Dataset.from_dict({"input_ids": ids, "completion_mask": completion_mask})
    model = make_model(seed=4)
    scored = counterfactual_impact(model, dataset, tokenizer, batch_size=2)
    for row, mask in zip(scored, completion_mask):
        completion = [i for i, bit in enumerate(mask) if bit]
        expected = naive_impacts(model, row["input_ids"], completion, "sum")
        assert row["counterfactual_impact"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_counterfactual_impact_refuses_more_forwards_than_max_tokens(make_model, tokenizer):
    dataset = Dataset.from_dict(
        {"input_ids": [[5, 9, 14, 7], [3, 11, 21]], "completion_mask": [[0, 1, 1, 1], [1, 1, 1]]}
    )
    # deletions: 9 and 14 in the first row (7 is last), 11 in the second (3 is at index 0, 21 is last): 3 forwards
    with pytest.raises(ValueError, match="needs 3 forwards .* above max_tokens=2"):
        counterfactual_impact(make_model(), dataset, tokenizer, max_tokens=2)
    assert len(counterfactual_impact(make_model(), dataset, tokenizer, max_tokens=3)) == 2
    with pytest.raises(ValueError, match="reduction='max'"):
        counterfactual_impact(make_model(), dataset, tokenizer, reduction="max")


def test_critical_counterfactual_by_hand():
    impact = torch.tensor([[0.3, -0.2, 0.0, 1.5], [-0.9, 0.05, 2.0, 0.7]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])  # 0.7 is not supervised
    selected = torch.zeros_like(mask)  # not read in threshold mode

    def phi(**args):
        return critical_counterfactual(impact, selected, mask, **args).tolist()

    # δ = 0, "helps": every supervised token whose deletion raises the rest's loss; 0.0 is not > 0
    assert phi() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    assert phi(delta=0.5) == [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    # "hurts": the table's sign with L the NLL, tokens whose deletion lowers the rest's loss
    assert phi(direction="hurts") == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert phi(direction="either", delta=0.25) == [[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]
    assert phi(delta=-0.5) == [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]


def test_critical_counterfactual_top_mode_by_hand():
    impact = torch.tensor([[0.3, -0.2, 0.0, 1.5], [-0.9, 0.05, 2.0, 0.7]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    # 7 supervised impacts 0.3 −0.2 0.0 1.5 −0.9 0.05 2.0; ratio 0.5 keeps round(3.5) = 4: 2.0 1.5 0.3 0.05
    phi = phi_of("critical_counterfactual", {"counterfactual_impact": impact, "mask": mask}, mode="top")
    assert phi.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    # by |impact|, ratio 2/7 keeps round(2) = 2: 2.0 1.5
    args = {"mode": "top", "direction": "either", "ratio": 2 / 7}
    phi = phi_of("critical_counterfactual", {"counterfactual_impact": impact, "mask": mask}, **args)
    assert phi.tolist() == [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    # by −impact ("hurts"), ratio 2/7: −0.9, −0.2
    args = {"mode": "top", "direction": "hurts", "ratio": 2 / 7}
    phi = phi_of("critical_counterfactual", {"counterfactual_impact": impact, "mask": mask}, **args)
    assert phi.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_critical_counterfactual_threshold_mode_refuses_a_selection_scope():
    with pytest.raises(PriorityError, match="scope='step'.*only mode='top'"):
        get_priority("critical_counterfactual").resolve_args({"scope": "step"})
    get_priority("critical_counterfactual").resolve_args({"mode": "top", "scope": "step"})


def original_columns(tokenizer, dataset, column: str) -> dict[tuple[int, ...], tuple[list[float], list[int]]]:
    """Each example's input_ids -> (its scored column, its completion mask), straight from the chat template."""
    out = {}
    for example in dataset:
        ids, prompt_len = chat_ids(tokenizer, example)
        out[tuple(ids)] = (example[column], [0] * prompt_len + [1] * (len(ids) - prompt_len))
    return out


@pytest.mark.parametrize(
    "settings",
    [{}, {"padding_free": True, "max_length": None}, {"packing": True}],
    ids=["padded", "padding_free", "packing"],
)
def test_critical_counterfactual_through_the_trainer(settings, make_model, tokenizer, datasets_, make_args):
    """Φ at position t is 1 exactly where the label t + 1 is a completion token of its example (the first of an example
    under padding-free/packing predicts across the boundary and is masked) with an impact > δ, read from the
    scored example the row holds."""
    delta = 0.05
    scored = counterfactual_impact(make_model(seed=3), datasets_.conversational_prompt_completion(4), tokenizer)
    args = make_args(
        priority="critical_counterfactual",
        priority_args={"delta": delta},
        per_device_train_batch_size=4,
        max_steps=1,
        shuffle_dataset=False,
        **{"max_length": 256, **settings},
    )
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=scored, processing_class=tokenizer)
    originals = original_columns(tokenizer, scored, "counterfactual_impact")
    rows = list(trainer.train_dataset)
    if settings.get("packing"):
        assert any(len(row["seq_lengths"]) > 1 for row in rows)
    # the expected Φ of each row's tokens, example by example, from the originals alone
    kept_rows = []
    for row in rows:
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        start, keep = 0, []
        for length in lengths:
            impact, completion = originals[tuple(row["input_ids"][start : start + length])]
            keep += [float(c == 1 and v > delta) for v, c in zip(impact, completion)]
            keep[-length] = 0.0  # the example's first token: nothing of its own predicts it
            start += length
        kept_rows.append(keep)
    if settings.get("padding_free"):  # the collator concatenates the rows into one
        kept_rows = [sum(kept_rows, [])]
    expected_rows = [keep[1:] for keep in kept_rows]  # position t scores the label t + 1
    batch = trainer.data_collator(rows)
    phi = trainer.token_priorities(batch)
    expected = torch.zeros_like(phi)
    for r, keep in enumerate(expected_rows):
        expected[r, : len(keep)] = torch.tensor(keep)
    assert torch.equal(phi, expected)
    assert 0 < expected.sum() < (batch["labels"][:, 1:] != -100).sum()  # some tokens kept, some dropped
    trainer.train()
    assert 0 < trainer.state.log_history[0]["priority/kept_fraction"] < 1


def test_counterfactual_command_line_matches_the_function(tmp_path, model_dir, datasets_, tokenizer):
    source = tmp_path / "source"
    source.mkdir()
    datasets_.conversational_prompt_completion(2).to_json(source / "train.jsonl")
    model = model_dir(seed=1)
    path = main(["counterfactual", "--model", model, "--dataset", str(source), "--output", str(tmp_path / "i")])
    rows = load_dataset(str(path.parent), split="train")
    assert rows.column_names == ["prompt", "completion", "counterfactual_impact"]
    from transformers import AutoModelForCausalLM

    direct = counterfactual_impact(
        AutoModelForCausalLM.from_pretrained(model), load_dataset(str(source), split="train"), tokenizer
    )
    for got, want in zip(rows["counterfactual_impact"], direct["counterfactual_impact"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="above max_tokens=1"):
        main(["counterfactual", "--model", model, "--dataset", str(source), "--output", str(tmp_path / "j"),
              "--max_tokens", "1"])  # fmt: skip


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
    phi = phi_of("tshirt", {"information_gain": sign * gain * mask, "mask": mask}, ratio=ratio)
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
    from trl_priority.tools import builtin

    wrong = builtin.load_gsm8k_wrong(limit=4)
    contrast = builtin.load_gsm8k_contrast(limit=4)
    assert wrong.column_names == ["prompt", "completion"] and len(wrong) == 4
    assert wrong["completion"] == [row["completion"] for row in contrast if row["unlearn"] == 1]
    correct = builtin.load_gsm8k(limit=4)
    assert all(w != c for w, c in zip(wrong["completion"], correct["completion"]))
