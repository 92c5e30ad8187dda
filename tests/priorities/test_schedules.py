"""Schedules over training (warm-up, annealed hyperparameters) and Φ pooled over whole words or labelled spans."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from trl_priority import PrioritySFTTrainer, register_priority
from trl_priority.data.columns import word_indices
from trl_priority.priorities import registry
from trl_priority.priorities.schedules import blend_with_uniform, pool_over_groups, schedule_value, warmup_weight
from trl_priority.statistics import DATA_STATISTICS, register_data_statistic


def test_schedule_values_in_closed_form():
    assert [schedule_value(1.0, 0.6, "linear", s) for s in (0, 0.25, 1)] == pytest.approx([1.0, 0.9, 0.6])
    # half cosine: (1 − cos πs) / 2 of the way
    assert schedule_value(1.0, 0.6, "cosine", 0.25) == pytest.approx(1.0 - 0.4 * (1 - math.cos(math.pi / 4)) / 2)
    assert schedule_value(0.0, 1.0, "cosine", 0.5) == pytest.approx(0.5)
    assert [schedule_value(0.2, 0.8, "step", s, at=0.3) for s in (0.29, 0.3, 0.9)] == [0.2, 0.8, 0.8]
    assert schedule_value(0.0, 1.0, "linear", 1.7) == 1.0  # clamped
    with pytest.raises(ValueError, match="not one of"):
        schedule_value(0, 1, "exponential", 0.5)


def test_warmup_blends_from_uniform():
    assert [warmup_weight(p, 0.2) for p in (0.0, 0.1, 0.2, 0.9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert warmup_weight(0.0, 0.0) == 1.0
    phi = torch.tensor([[0.0, 1.0, 0.2]])
    mask = torch.tensor([[True, True, False]])
    assert blend_with_uniform(phi, mask, 0.5).tolist() == [[0.5, 1.0, 0.0]]


def test_warmup_scales_a_negative_phi_towards_zero():
    # w = 0.25: Φ ≥ 0 blends with 1, (0.75 + 0.25·Φ); Φ < 0 is scaled, 0.25·Φ: never positive (blending would give
    # 0.75 − 0.25 = 0.5 for Φ = −1, learning the token the method unlearns)
    phi = torch.tensor([[-1.0, -0.4, 0.0, 0.5, 1.0, -2.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    torch.testing.assert_close(
        blend_with_uniform(phi, mask, 0.25), torch.tensor([[-0.25, -0.1, 0.75, 0.875, 1.0, 0.0]])
    )
    torch.testing.assert_close(blend_with_uniform(phi, mask, 0.0), torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]]))


def test_pooling_keeps_the_sign_of_the_most_negative_token():
    # One word of three tokens, Φ = 1, −0.5, 0.3 (learned, unlearned, learned); another word, Φ = 0.2, 0.6; an
    # ungrouped token −1 keeps its own Φ. Whatever the pooling, the first word is unlearned at −0.5, the most negative Φ.
    phi = torch.tensor([[1.0, -0.5, 0.3, 0.2, 0.6, -1.0]])
    groups = torch.tensor([[0, 0, 0, 1, 1, -1]])
    mask = torch.ones_like(phi, dtype=torch.bool)
    expected = {
        "max": [-0.5, -0.5, -0.5, 0.6, 0.6, -1.0],
        "mean": [-0.5, -0.5, -0.5, 0.4, 0.4, -1.0],
        "min": [-0.5, -0.5, -0.5, 0.2, 0.2, -1.0],
    }
    for how, values in expected.items():
        torch.testing.assert_close(pool_over_groups(phi, groups, mask, how), torch.tensor([values]), msg=how)


def test_pooling_against_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    phi = torch.rand(3, 9, generator=generator)
    groups = torch.randint(-1, 4, (3, 9), generator=generator)
    mask = torch.rand(3, 9, generator=generator) > 0.2
    for how, reduce in (("max", max), ("min", min), ("mean", lambda v: sum(v) / len(v))):
        expected = phi.clone()
        for b in range(3):
            for t in range(9):
                if mask[b, t] and groups[b, t] >= 0:
                    members = [phi[b, u].item() for u in range(9) if mask[b, u] and groups[b, u] == groups[b, t]]
                    expected[b, t] = reduce(members)
        torch.testing.assert_close(pool_over_groups(phi, groups, mask, how), expected)


def test_words_keep_numbers_split_into_several_tokens_whole(tokenizer):
    text = "Sam paid 1234567 dollars, then 98765."
    ids = tokenizer(text)["input_ids"]
    words = word_indices(ids, tokenizer)
    pieces = [tokenizer.decode([i]) for i in ids]
    by_word = {}
    for word, piece in zip(words, pieces):
        by_word[word] = by_word.get(word, "") + piece
    assert list(by_word.values()) == ["Sam", " paid", " 1234567", " dollars,", " then", " 98765."]
    assert sum(1 for piece in pieces if piece.strip().isdigit()) > 2  # the numbers really are split


@pytest.fixture
def profit_on_numbers(make_model, tokenizer, make_args):
    def make(**settings):
        dataset = Dataset.from_dict(
            {
                "prompt": ["Add them. ", "Add these. "],
                "completion": ["1234567 + 98765 = 1333332", "5555 + 4444 = 9999"],
            }
        )
        args = make_args(priority="profit", priority_args={"tau": 0.0035}, **settings)
        return PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)

    return make


@pytest.mark.parametrize("pooling", ["max", "min"])
def test_word_granularity_keeps_whole_numbers(pooling, profit_on_numbers, tokenizer):
    tokens = profit_on_numbers()
    words = profit_on_numbers(priority_granularity="word", priority_pooling=pooling)
    rows = words.train_dataset.select(range(2))
    phi_token = tokens.token_priorities(tokens.train_dataset.select(range(2)))
    phi_word = words.token_priorities(rows)
    changed = False
    for b, row in enumerate(rows):
        ids, labels = row["input_ids"], row["labels"]
        word_of = word_indices(ids, tokenizer)
        for t in range(1, len(ids)):
            if labels[t] == -100:
                continue
            same_word = [u for u in range(1, len(ids)) if word_of[u] == word_of[t] and labels[u] != -100]
            members = [phi_token[b, u - 1].item() for u in same_word]
            expected = max(members) if pooling == "max" else min(members)
            assert phi_word[b, t - 1].item() == expected
            changed |= phi_token[b, t - 1].item() != expected
    assert changed  # the token-level selection did cut some word in half: pooling made it whole


def test_span_granularity_pools_over_labelled_spans(make_model, tokenizer, make_args):
    completion = "12 + 5 = 17.\n#### 17"
    dataset = Dataset.from_dict(
        {"prompt": ["Total? "], "completion": [completion], "spans": [[[0, 12], [13, len(completion)]]]}
    )
    args = make_args(priority="dft", priority_granularity="span", priority_pooling="mean")
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
    token_level = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="dft"), train_dataset=dataset, processing_class=tokenizer
    )
    phi = trainer.token_priorities(trainer.train_dataset.select([0]))[0]
    raw = token_level.token_priorities(token_level.train_dataset.select([0]))[0]
    spans = torch.tensor(trainer.train_dataset[0]["spans"][1:])  # the span number of each scored token
    mask = phi != 0
    for number in (1, 2):
        members = mask & (spans == number)
        assert members.any()
        torch.testing.assert_close(phi[members], raw[members].mean().expand(int(members.sum())))
    outside = mask & (spans == 0)  # the newline between the spans, and the end token: their own Φ
    torch.testing.assert_close(phi[outside], raw[outside])


def test_schedule_and_warmup_through_the_trainer(make_model, tokenizer, datasets_, make_args):
    args = make_args(
        priority="profit",
        priority_schedule={"tau": {"start": 0.0, "end": 0.5, "kind": "linear"}},
        priority_warmup_ratio=0.5,
        max_steps=4,
    )
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(8), processing_class=tokenizer
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["priority/tau"] for log in logs] == pytest.approx([0.0, 0.125, 0.25, 0.375])
    assert [log["priority/warmup_weight"] for log in logs] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert logs[0]["priority/kept_fraction"] == 1.0 and logs[0]["priority/mean"] == 1.0  # uniform SFT at step 0


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({"tua": {"end": 0.5}}, "names 'tua', which is no numeric hyperparameter of 'profit'"),
        ({"tau": {"end": 1.5}}, "tau=1.5 is outside"),
        ({"tau": {"end": 0.5, "kind": "exp"}}, "kind 'exp' is not one of"),
        ({"tau": {"start": 0.1}}, "needs at least an `end`"),
    ],
)
def test_bad_schedules_are_named(schedule, message, make_args):
    with pytest.raises(ValueError, match=message):
        make_args(priority="profit", priority_schedule=schedule)


def test_a_method_can_find_its_spans_in_the_text(make_model, tokenizer, make_args):
    """A span statistic derived from the completion itself (here: everything after a marker)."""

    def after_marker(completion, args):
        at = completion.find(args["marker"])
        return [] if at < 0 else [[at + len(args["marker"]), len(completion)]]

    register_data_statistic("after_marker", level="span", derive=after_marker)

    @register_priority(regime="hard", paper="a test")
    def answer_only(after_marker, mask, *, marker: str = "####"):
        """Φ = 1 after the marker"""
        return after_marker * mask

    try:
        dataset = Dataset.from_dict({"prompt": ["Total? "], "completion": ["12 + 5 = 17.\n#### 17"]})
        args = make_args(priority="answer_only")
        trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
        row = trainer.train_dataset[0]
        phi = trainer.token_priorities(trainer.train_dataset.select([0]))[0]
        kept = [row["input_ids"][t + 1] for t in range(len(row["input_ids"]) - 1) if phi[t] == 1]
        assert tokenizer.decode(kept, skip_special_tokens=True).strip() == "17"  # and the end token after it
    finally:
        registry._REGISTRY.pop("answer_only")
        DATA_STATISTICS.pop("after_marker")
