"""Example-level priorities (SelectIT, Instruction Mining, DIQ, OpenCoder): Φ against hand values, then through the
trainer under padding, padding-free and packing, where every token of an example must carry its example's Φ."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from trl_priority import PriorityError, PrioritySFTTrainer, get_priority


def per_example(values, T: int = 4) -> torch.Tensor:
    """`(B, T)`: one number per example, broadcast to its tokens as the collator does."""
    return torch.tensor(values, dtype=torch.float32)[:, None].expand(len(values), T).clone()


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)


def rows_of(phi: torch.Tensor) -> list[float]:
    """The value of each row on its supervised tokens (the test rows each hold one value), 0 for an empty row."""
    return [float(phi[i][MASK[i]][0]) if MASK[i].any() else 0.0 for i in range(phi.shape[0])]


def test_selectit_top_fraction_threshold_and_soft_by_hand():
    method = get_priority("selectit")
    score = per_example([3.0, 1.0, 2.5, 0.2, 4.0])
    rank = per_example([0.2, 0.6, 0.4, 0.8, 0.0])  # 1, 3, 2, 4, 0 of 5 score higher (consistent with `score`)
    stats = {"selectit_score": score, "selectit_rank": rank, "mask": MASK}
    # the default: the dataset's top 20% (one of five: rank 0, the last row, which has no supervised token)
    assert rows_of(method(stats, method.resolve_args({}))) == [0.0, 0.0, 0.0, 0.0, 0.0]
    # top 40%: ranks 0 and 0.2 (0.2 stored as float32 must not fall out at the cut)
    assert rows_of(method(stats, method.resolve_args({"fraction": 0.4}))) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert rows_of(method(stats, method.resolve_args({"fraction": 0.6}))) == [1.0, 0.0, 1.0, 0.0, 0.0]
    threshold = method(stats, method.resolve_args({"mode": "threshold", "threshold": 2.0}))
    assert rows_of(threshold) == [1.0, 0.0, 1.0, 0.0, 0.0]
    soft = method(stats, method.resolve_args({"mode": "soft", "threshold": 2.0, "temperature": 0.5}))
    expected = [1 / (1 + math.exp(-(s - 2.0) / 0.5)) for s in (3.0, 1.0, 2.5, 0.2)] + [0.0]
    assert rows_of(soft) == pytest.approx(expected)
    assert torch.all(soft[~MASK] == 0)


def test_soft_mode_needs_a_temperature():
    with pytest.raises(PriorityError, match="mode='soft' needs temperature > 0"):
        get_priority("selectit").resolve_args({"mode": "soft", "temperature": 0.0})


def test_instruction_mining_keeps_positive_influence_by_default():
    method = get_priority("instruction_mining")
    stats = {
        "influence": per_example([0.3, -0.1, 0.0, 0.05, 0.9]),
        "influence_rank": per_example([0.2, 0.8, 0.6, 0.4, 0.0]),
        "mask": MASK,
    }
    assert rows_of(method(stats, method.resolve_args({}))) == [1.0, 0.0, 0.0, 1.0, 0.0]  # Infl = 0 is not > 0
    assert rows_of(method(stats, method.resolve_args({"mode": "top", "fraction": 0.4}))) == [1.0, 0, 0, 0, 0]


def test_diq_keeps_the_high_difficulty_high_influence_quadrant():
    method = get_priority("diq")
    stats = {  # (difficulty rank, influence rank): hard & influential, hard only, influential only, neither, both
        "diq_difficulty_rank": per_example([0.0, 0.2, 0.6, 0.8, 0.4]),
        "influence_rank": per_example([0.2, 0.8, 0.0, 0.6, 0.4]),
        "mask": MASK,
    }
    assert rows_of(method(stats, method.resolve_args({}))) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # wider cuts: the 4th row (0.4, 0.4) is in both top 60%, but it has no supervised token
    phi = method(stats, method.resolve_args({"difficulty_fraction": 0.6, "influence_fraction": 0.6}))
    assert rows_of(phi) == [1.0, 0.0, 0.0, 0.0, 0.0] and phi[4].sum() == 0


def test_opencoder_needs_both_the_heuristics_and_the_classifier():
    method = get_priority("opencoder")
    stats = {
        "code_heuristics": per_example([1.0, 1.0, 0.0, 0.0, 1.0]),
        "classifier": per_example([0.9, 0.5, 0.9, 0.1, 0.9]),
        "mask": MASK,
    }
    assert rows_of(method(stats, method.resolve_args({}))) == [1.0, 0.0, 0.0, 0.0, 0.0]  # 0.5 is not > 0.5
    assert rows_of(method(stats, method.resolve_args({"threshold": 0.4}))) == [1.0, 1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------------------------
# Through the trainer: padding, padding-free, packing
# ------------------------------------------------------------------------------------------------------------------
ROWS = [  # completions of different lengths, so the kept token count tells which examples were kept
    ("Tom has 3 apples and buys 4 more. How many apples? ", "3 + 4 = 7 apples.\n#### 7", 0.0),
    ("A box holds 6 pens. How many pens in 2 boxes? ", "6 * 2 = 12 pens, two boxes of six.\n#### 12", 0.75),
    ("Sam had 10 cards and gave away 3. How many are left? ", "10 - 3 = 7 cards are left.\n#### 7", 0.25),
    ("Half of 18 children play. How many play? ", "18 / 2 = 9 children play, half of them.\n#### 9", 0.5),
]


def supervised_counts(trainer) -> list[int]:
    """Supervised targets per example of an unpacked, padded trainer's dataset (position 0 predicts nothing)."""
    return [sum(label != -100 for label in row["labels"][1:]) for row in trainer.train_dataset]


def method_columns(method: str, ranks: list[float]) -> tuple[dict, dict]:
    """Columns under which `method` keeps exactly the examples of rank < 0.5 (the top half of four), and its args."""
    if method == "selectit":
        return {"selectit_score": [1.0 - r for r in ranks], "selectit_rank": ranks}, {"fraction": 0.5}
    if method == "instruction_mining":  # Infl > 0 exactly on the kept ones
        return {"influence": [0.5 - r for r in ranks], "influence_rank": ranks}, {}
    if method == "diq":  # hard and influential: the kept ones are in the top half of both
        return {"diq_difficulty_rank": ranks, "influence_rank": [0.0] * len(ranks)}, {}
    # opencoder: the dropped ones fail the heuristics, or (the last one) only the classifier
    return {"code_heuristics": [1.0, 0.0, 1.0, 1.0], "classifier": [0.9, 0.9, 0.8, 0.3]}, {}


@pytest.mark.parametrize("method", ["selectit", "instruction_mining", "diq", "opencoder"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"padding_free": True, "max_length": None}, {"packing": True}],
    ids=["padded", "padding_free", "packing"],
)
def test_whole_examples_are_kept_through_padding_free_and_packing(method, settings, make_model, tokenizer, make_args):
    ranks = [r for _, _, r in ROWS]
    columns, priority_args = method_columns(method, ranks)
    dataset = Dataset.from_dict({"prompt": [p for p, _, _ in ROWS], "completion": [c for _, c, _ in ROWS], **columns})
    args = {"priority": method, "priority_args": priority_args, "shuffle_dataset": False, "max_length": 256}
    plain = PrioritySFTTrainer(
        model=make_model(), args=make_args(**args), train_dataset=dataset, processing_class=tokenizer
    )
    counts = supervised_counts(plain)  # in the dataset's order (no shuffle, no packing)
    assert len(set(counts)) == len(counts)  # distinct lengths: the kept count identifies the kept examples

    trainer = PrioritySFTTrainer(
        model=make_model(), args=make_args(**{**args, **settings}), train_dataset=dataset, processing_class=tokenizer
    )
    if settings.get("packing"):
        assert len(trainer.train_dataset) < len(ROWS)  # several examples share a row
    batch = trainer.data_collator(list(trainer.train_dataset))
    if settings.get("padding_free"):
        assert batch["input_ids"].shape[0] == 1  # one flattened row
    phi = trainer.token_priorities(trainer.train_dataset.select(range(len(trainer.train_dataset))))
    supervised = phi[batch["labels"][:, 1:] != -100]
    # the top half of four: ranks 0 and 0.25 (examples 0 and 2), every one of their tokens at Φ = 1, none other
    assert set(supervised.tolist()) == {0.0, 1.0}
    assert int((supervised == 1).sum()) == counts[0] + counts[2]
    assert int((supervised == 0).sum()) == counts[1] + counts[3]
    trainer.train()


def test_a_missing_score_column_names_its_scorer(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="reads the column 'influence'.*example_scores.influence_scores"):
        PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority="instruction_mining"),
            train_dataset=datasets_.prompt_completion(2),
            processing_class=tokenizer,
        )
