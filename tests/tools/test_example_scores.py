"""Offline example-level scores (`trl_priority.tools.example_scores`) against hand-worked values and naive computations.

SelectIT's self-reflection scores against probabilities read off a tiny model's logits by hand; influence against
explicit per-example gradients (one `backward()` per example, plain autograd) and dot products in a Python loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from trl_priority.tools import example_scores as es


# ------------------------------------------------------------------------------------------------------------------
# SelectIT
# ------------------------------------------------------------------------------------------------------------------
def test_selectit_token_score_by_hand():
    probabilities = [0.1, 0.2, 0.4, 0.2, 0.1]
    # argmax rating 3; spread = ((.4-.1) + (.4-.2) + 0 + (.4-.2) + (.4-.1)) / 4 = 0.25; score 3 · 0.25
    assert es.selectit_token_score(probabilities, [1, 2, 3, 4, 5]) == pytest.approx(0.75)
    # any scale: the probabilities are renormalised over the ratings
    assert es.selectit_token_score([1, 2, 4, 2, 1], [1, 2, 3, 4, 5]) == pytest.approx(0.75)
    # expected rating: .1 + .4 + 1.2 + .8 + .5
    assert es.selectit_token_score(probabilities, [1, 2, 3, 4, 5], "expected") == pytest.approx(3.0)
    # a certain model: the whole mass on 5 gives 5 · (4 · 1) / 4 = 5
    assert es.selectit_token_score([0, 0, 0, 0, 1], [1, 2, 3, 4, 5]) == pytest.approx(5.0)


def test_selectit_sentence_score_by_hand():
    # mean 2, population std sqrt(2/3): 2 / (1 + 0.5 · 0.8165)
    assert es.selectit_sentence_score([1.0, 2.0, 3.0], alpha=0.5) == pytest.approx(2 / (1 + 0.5 * math.sqrt(2 / 3)))
    assert es.selectit_sentence_score([2.0, 2.0], alpha=10.0) == pytest.approx(2.0)  # no spread, no penalty


def test_share_ahead_by_hand():
    assert es.share_ahead([0.3, 0.9, 0.1, 0.9, 0.5]) == [0.6, 0.0, 0.8, 0.0, 0.4]  # 3, 0, 4, 0, 2 of 5 score higher


PAIRS = [("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7 apples."),
         ("Half of 18 children play. How many play?", "18 / 2 = 9 children.")]  # fmt: skip
PROMPTS = ("Rate it from 1 to 5.", "Score the answer, 1 to 5.")


def test_selectit_scores_match_probabilities_read_by_hand(tokenizer, make_model):
    models = [make_model(seed=0), make_model(seed=1)]
    dataset = Dataset.from_dict({"prompt": [q for q, _ in PAIRS], "completion": [a for _, a in PAIRS]})
    scored = es.selectit_scores(models, tokenizer, dataset, prompts=PROMPTS, alpha=0.3, weights=[1.0, 3.0])

    digits = [tokenizer.convert_tokens_to_ids(str(r)) for r in range(1, 6)]
    expected = []
    for question, answer in PAIRS:
        total = 0.0
        for model, weight in zip(models, [0.25, 0.75]):
            token_scores = []
            for prompt in PROMPTS:
                text = f"{prompt}\nInstruction: {question}\nResponse: {answer}\nThe score is: "
                ids = torch.tensor([tokenizer(text)["input_ids"]])
                with torch.no_grad():
                    last = model(input_ids=ids).logits[0, -1].double().softmax(-1)
                p = [float(last[d]) for d in digits]
                p = [x / sum(p) for x in p]
                best = p.index(max(p))
                spread = sum(p[best] - x for x in p) / 4
                token_scores.append((best + 1) * spread)
            mean = sum(token_scores) / len(token_scores)
            std = math.sqrt(sum((s - mean) ** 2 for s in token_scores) / len(token_scores))
            total += weight * mean / (1 + 0.3 * std)
        expected.append(total)
    assert scored["selectit_score"] == pytest.approx(expected, rel=1e-5)
    assert scored["selectit_rank"] == ([0.0, 0.5] if expected[0] > expected[1] else [0.5, 0.0])


def test_selectit_weights_models_by_size_by_default(tokenizer, make_model):
    dataset = Dataset.from_dict({"prompt": [PAIRS[0][0]], "completion": [PAIRS[0][1]]})
    small, large = make_model(seed=0), make_model(seed=1, vocab_size=len(tokenizer) + 64)  # more parameters
    alone = [es.selectit_scores(m, tokenizer, dataset, prompts=PROMPTS)["selectit_score"][0] for m in (small, large)]
    sizes = [sum(p.numel() for p in m.parameters()) for m in (small, large)]
    both = es.selectit_scores([small, large], tokenizer, dataset, prompts=PROMPTS)["selectit_score"][0]
    assert both == pytest.approx((sizes[0] * alone[0] + sizes[1] * alone[1]) / sum(sizes), rel=1e-6)


def test_selectit_refuses_a_rating_without_a_token_and_a_text_row(tokenizer, make_model):
    dataset = Dataset.from_dict({"prompt": ["Q"], "completion": ["A"]})
    with pytest.raises(ValueError, match="no single token for the rating 10"):
        es.selectit_scores(make_model(), tokenizer, dataset, ratings=(1, 10))
    with pytest.raises(ValueError, match="plain 'text' row has no response to rate"):
        es.selectit_scores(make_model(), tokenizer, Dataset.from_dict({"text": ["Q A"]}))


# ------------------------------------------------------------------------------------------------------------------
# Influence (Instruction Mining, DIQ)
# ------------------------------------------------------------------------------------------------------------------
def lora_model(make_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(make_model(seed=0), config)  # both LoRA factors random: every gradient is non-zero


def tokenized(rows: list[tuple[list[int], list[int]]]) -> Dataset:
    return Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "completion_mask": [m for _, m in rows]})


TRAIN = tokenized([([5, 9, 40, 41, 42, 3], [0, 0, 1, 1, 1, 1]), ([7, 50, 51, 3], [0, 1, 1, 1]),
                   ([8, 8, 60, 61, 62, 63, 3], [0, 0, 0, 1, 1, 1, 1])])  # fmt: skip
VALIDATION = tokenized([([5, 9, 40, 44, 3], [0, 0, 1, 1, 1]), ([6, 70, 71, 3], [0, 0, 1, 1])])


def naive_loss_and_gradient(model, ids, completion_mask) -> tuple[float, torch.Tensor]:
    """One example alone: mean NLL of its completion tokens from the full logits, `backward()`, the trainable
    parameters' .grad flattened in the model's parameter order."""
    model.zero_grad()
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    terms = [-logits[i - 1].log_softmax(-1)[ids[i]] for i in range(1, len(ids)) if completion_mask[i]]
    loss = sum(terms) / len(terms)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters() if p.requires_grad])
    model.zero_grad()
    return float(loss.detach()), grad.double()


def naive_influence(train_grads, validation_grads, cosine: bool) -> list[float]:
    out = []
    for g in train_grads:
        total = 0.0
        for v in validation_grads:
            dot = sum(float(a) * float(b) for a, b in zip(g, v))
            if cosine:
                dot /= math.sqrt(sum(float(a) ** 2 for a in g)) * math.sqrt(sum(float(b) ** 2 for b in v))
            total += dot
        out.append(total / len(validation_grads))
    return out


@pytest.fixture
def naive(make_model):
    model = lora_model(make_model)
    model.eval()
    train = [naive_loss_and_gradient(model, r["input_ids"], r["completion_mask"]) for r in TRAIN]
    validation = [naive_loss_and_gradient(model, r["input_ids"], r["completion_mask"]) for r in VALIDATION]
    return model, train, validation


def test_influence_without_projection_is_the_mean_cosine_of_explicit_gradients(naive, tokenizer):
    model, train, validation = naive
    scored = es.influence_scores(model, tokenizer, TRAIN, VALIDATION, proj_dim=None)
    expected = naive_influence([g for _, g in train], [g for _, g in validation], cosine=True)
    assert scored["influence"] == pytest.approx(expected, abs=1e-6)
    assert all(abs(x) > 1e-4 for x in expected)  # a real signal, not zeros agreeing
    order = sorted(range(3), key=lambda i: -expected[i])
    assert [scored["influence_rank"][i] for i in order] == [0.0, 1 / 3, 2 / 3]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_influence_is_the_cosine_of_the_seeded_projection(naive, tokenizer, kind):
    model, train, validation = naive
    n_params = train[0][1].numel()
    assert n_params < es.PROJECTION_BLOCK  # one block: the matrix is that block
    matrix = es.projection_block(7, 0, n_params, 16, kind).double()  # (n_params, 16)
    if kind == "rademacher":
        assert set((matrix * 4).round().unique().tolist()) == {-1.0, 1.0}  # ±1/√16
    scored = es.influence_scores(model, tokenizer, TRAIN, VALIDATION, proj_dim=16, seed=7, projection=kind, chunk=2)
    expected = naive_influence([g @ matrix for _, g in train], [g @ matrix for _, g in validation], cosine=True)
    assert scored["influence"] == pytest.approx(expected, abs=1e-5)


def test_projection_preserves_cosines_in_high_dimension(naive, tokenizer):
    """Johnson-Lindenstrauss: with d = 4096 the projected cosines are within a few 1/√d of the exact ones."""
    model, train, validation = naive
    exact = naive_influence([g for _, g in train], [g for _, g in validation], cosine=True)
    projected = es.influence_scores(model, tokenizer, TRAIN, VALIDATION, proj_dim=4096, seed=0)["influence"]
    assert projected == pytest.approx(exact, abs=0.08)


def test_projection_is_fixed_by_the_seed_across_blocks():
    gradients = torch.randn(2, es.PROJECTION_BLOCK + 100, generator=torch.Generator().manual_seed(0))
    first, again = es.project(gradients, 8, seed=3), es.project(gradients, 8, seed=3)
    assert torch.equal(first, again) and not torch.equal(first, es.project(gradients, 8, seed=4))
    blocks = torch.cat([es.projection_block(3, 0, es.PROJECTION_BLOCK, 8), es.projection_block(3, 1, 100, 8)])
    torch.testing.assert_close(first, gradients @ blocks)


def test_diq_difficulty_is_the_loss_and_influence_the_dot_product(naive, tokenizer):
    model, train, validation = naive
    scored = es.diq_scores(model, tokenizer, TRAIN, VALIDATION, proj_dim=None)
    assert scored["diq_difficulty"] == pytest.approx([loss for loss, _ in train], rel=1e-6)
    expected = naive_influence([g for _, g in train], [g for _, g in validation], cosine=False)
    assert scored["influence"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert set(scored.column_names) >= {"diq_difficulty_rank", "influence_rank"}


def test_influence_needs_trainable_parameters_and_a_validation_set(make_model, tokenizer):
    frozen = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        es.influence_scores(frozen, tokenizer, TRAIN, VALIDATION)
    with pytest.raises(ValueError, match="validation set is empty"):
        es.influence_scores(make_model(), tokenizer, TRAIN, VALIDATION.select([]))


def test_command_line_writes_the_scored_columns(tmp_path, model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = model_dir(seed=0)
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_dict({"prompt": [q for q, _ in PAIRS], "completion": [a for _, a in PAIRS]}).to_json(
        data / "train.jsonl"
    )
    written = es.main(["selectit", "--model", model, "--dataset", str(data), "--output", str(tmp_path / "s")])
    scored = Dataset.from_json(str(written))
    direct = es.selectit_scores(
        AutoModelForCausalLM.from_pretrained(model),
        tokenizer,
        scored.remove_columns(["selectit_score", "selectit_rank"]),
    )
    assert scored["selectit_score"] == pytest.approx(direct["selectit_score"], rel=1e-5)
    written = es.main(
        ["diq", "--model", model, "--dataset", str(data), "--validation", str(data), "--proj_dim", "8",
         "--output", str(tmp_path / "d"), "--lora_r", "2"]
    )  # fmt: skip
    columns = Dataset.from_json(str(written)).column_names
    assert {"diq_difficulty", "diq_difficulty_rank", "influence", "influence_rank"} <= set(columns)


def test_scored_raw_dataset_trains_with_its_method(make_model, tokenizer, datasets_, make_args):
    """From a raw prompt-completion dataset to Φ: the scorer tokenizes like the trainer, the columns travel to the
    tokens, and exactly the examples with Infl > τ keep their tokens."""
    from trl_priority import PrioritySFTTrainer

    model = lora_model(make_model)
    train, validation = datasets_.prompt_completion(6), datasets_.conversational_prompt_completion(8).select([6, 7])
    validation = Dataset.from_dict(
        {"prompt": [m[0]["content"] for m in validation["prompt"]],
         "completion": [m[0]["content"] for m in validation["completion"]]}
    )  # fmt: skip
    scored = es.influence_scores(model, tokenizer, train, validation, proj_dim=64)
    ordered = sorted(scored["influence"])  # a random model's gradients mostly agree: cut between the 3rd and 4th
    threshold = (ordered[2] + ordered[3]) / 2  # midway, so float32 rounding of the column cannot move an example
    positive = [x > threshold for x in scored["influence"]]
    assert sum(positive) == 3  # both kinds, so the test can tell them apart

    args = make_args(
        priority="instruction_mining", priority_args={"threshold": threshold}, max_length=256, shuffle_dataset=False
    )
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=scored, processing_class=tokenizer)
    rows = trainer.train_dataset
    phi = trainer.token_priorities(rows.select(range(len(rows))))
    labels = trainer.data_collator(list(rows))["labels"][:, 1:]
    for i in range(len(rows)):
        kept = phi[i][labels[i] != -100]
        assert kept.numel() > 0 and torch.all(kept == float(positive[i]))
