"""Per-token data columns (here WIT's response mask) through truncation, padding, padding-free and packing."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_priority import PrioritySFTTrainer
from trl_priority.data.columns import TokenColumnCollator


PROMPT_WEIGHT, RESPONSE_WEIGHT = 0.25, 0.75


def wit_trainer(make_model, tokenizer, dataset, make_args, **overrides):
    args = make_args(
        priority="wit",
        priority_args={"prompt_weight": PROMPT_WEIGHT, "response_weight": RESPONSE_WEIGHT},
        **overrides,
    )
    return PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)


def expected_counts(rows) -> tuple[int, int]:
    """(prompt, response) targets of unpacked rows: every token but the first is a target, and its weight follows the
    completion mask of the token it predicts."""
    prompt = sum(len(mask) - 1 - sum(mask[1:]) for mask in rows["completion_mask"])
    response = sum(sum(mask[1:]) for mask in rows["completion_mask"])
    return prompt, response


def weight_counts(phi: torch.Tensor) -> tuple[int, int]:
    return int((phi == PROMPT_WEIGHT).sum()), int((phi == RESPONSE_WEIGHT).sum())


@pytest.mark.parametrize("kind", ["prompt_completion", "conversational_prompt_completion"])
def test_wit_weights_prompt_and_response_tokens(kind, make_model, tokenizer, datasets_, make_args):
    trainer = wit_trainer(make_model, tokenizer, getattr(datasets_, kind)(4), make_args)
    rows = trainer.train_dataset[:4]
    # Prompt tokens keep their labels: WIT trains on them
    assert all(-100 not in labels for labels in rows["labels"])
    phi = trainer.token_priorities(trainer.train_dataset.select(range(4)))
    for i, mask in enumerate(rows["completion_mask"]):
        n = len(mask)
        expected = [RESPONSE_WEIGHT if m else PROMPT_WEIGHT for m in mask[1:]]
        assert phi[i, : n - 1].tolist() == expected
        assert torch.all(phi[i, n - 1 :] == 0)  # padding
    assert set(phi.unique().tolist()) == {0.0, PROMPT_WEIGHT, RESPONSE_WEIGHT}
    trainer.train()


def test_wit_padding_free_matches_padded(make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(4)
    padded = wit_trainer(make_model, tokenizer, dataset, make_args)
    free = wit_trainer(make_model, tokenizer, dataset, make_args, padding_free=True, max_length=None)
    rows = padded.train_dataset.select(range(4))
    phi_padded = padded.token_priorities(rows)
    phi_free = free.token_priorities(free.train_dataset.select(range(4)))

    assert phi_free.shape[0] == 1  # one flattened row
    lengths = [len(ids) for ids in rows["input_ids"]]
    # The flattened row's targets are each example's targets, plus one masked target at each example boundary
    expected = torch.cat([torch.cat([phi_padded[i, : n - 1], torch.zeros(1)]) for i, n in enumerate(lengths)])[:-1]
    torch.testing.assert_close(phi_free[0], expected)
    free.train()


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_wit_columns_survive_packing(strategy, make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(8)
    unpacked = wit_trainer(make_model, tokenizer, dataset, make_args, max_length=None)
    prompt, response = expected_counts(unpacked.train_dataset[:])

    packed = wit_trainer(
        make_model, tokenizer, dataset, make_args, packing=True, packing_strategy=strategy, max_length=128
    )
    columns = packed.train_dataset.column_names
    assert "completion_mask" in columns and len(packed.train_dataset) < 8
    for row in packed.train_dataset:
        assert len(row["completion_mask"]) == len(row["input_ids"]) == len(row["labels"])
    phi = packed.token_priorities(packed.train_dataset)
    if strategy == "bfd":
        # Documents stay whole: every example's targets are weighted as unpacked, boundaries masked
        assert weight_counts(phi) == (prompt, response)
    else:
        # Wrapped packing cuts documents: each cut loses one target, never more
        got = weight_counts(phi)
        assert sum(got) >= prompt + response - len(packed.train_dataset) and got[1] <= response
    packed.train()


def test_token_columns_are_truncated_with_the_tokens(make_model, tokenizer, datasets_, make_args):
    trainer = wit_trainer(make_model, tokenizer, datasets_.prompt_completion(4), make_args, max_length=12)
    for row in trainer.train_dataset:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["completion_mask"]) == 12


def test_misaligned_token_column_names_the_example(make_model, tokenizer, make_args):
    dataset = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [5, 6, 7]], "completion_mask": [[0, 0, 1, 1], [0, 1]]})
    with pytest.raises(ValueError, match="Example 1: column 'completion_mask' has 2 values but the example has 3"):
        wit_trainer(make_model, tokenizer, dataset, make_args)


def test_wit_on_a_dataset_without_a_prompt_is_a_clear_error(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="column 'completion_mask'.*prompt-completion"):
        wit_trainer(make_model, tokenizer, datasets_.text(4), make_args)


def test_wit_refuses_completion_only_loss(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="completion_only_loss"):
        wit_trainer(make_model, tokenizer, datasets_.prompt_completion(4), make_args, completion_only_loss=True)


def test_collator_pads_and_flattens_columns():
    def base(examples):
        ids = [torch.tensor(e["input_ids"]) for e in examples]
        width = max(len(i) for i in ids)
        return {"input_ids": torch.stack([torch.nn.functional.pad(i, (0, width - len(i))) for i in ids])}

    examples = [{"input_ids": [1, 2, 3], "weights": [0.5, 1.0, 2.0]}, {"input_ids": [4], "weights": [3.0]}]
    batch = TokenColumnCollator(base, ("weights",), padding_free=False)(examples)
    assert batch["weights"].tolist() == [[0.5, 1.0, 2.0], [3.0, 0.0, 0.0]]
    assert "weights" not in base([{"input_ids": [1]}])  # the base collator never saw the column

    def flat(examples):
        return {"input_ids": torch.tensor([[i for e in examples for i in e["input_ids"]] + [0, 0]])}  # padded to 6

    batch = TokenColumnCollator(flat, ("weights",), padding_free=True)(examples)
    assert batch["weights"].tolist() == [[0.5, 1.0, 2.0, 3.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------------------------------------------
# WIT's normaliser, and example-level, span and per-token columns from the open data-statistic registry
# ----------------------------------------------------------------------------------------------------------------
def test_wit_without_prompt_weight_is_completion_only_sft_exactly(make_model, tokenizer, datasets_, make_args):
    from trl import SFTConfig, SFTTrainer

    dataset = datasets_.prompt_completion(8)
    args = make_args(priority="wit", priority_args={"prompt_weight": 0.0, "response_weight": 1.0}, max_steps=3)
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    values = {f.name: getattr(args, f.name) for f in __import__("dataclasses").fields(SFTConfig) if f.init}
    reference = SFTTrainer(
        model=make_model(), args=SFTConfig(**values), train_dataset=dataset, processing_class=tokenizer
    )
    reference.train()

    def losses(t):
        return [log["loss"] for log in t.state.log_history if "loss" in log]

    assert losses(trainer) == losses(reference)  # bitwise: same labels, same N, Φ = 1 on the completion
    assert args.completion_only_loss is None  # the user's config is left as written


def test_wit_with_both_weights_zero_is_refused(make_args):
    with pytest.raises(ValueError, match="both 0, so no token would train"):
        make_args(priority="wit", priority_args={"prompt_weight": 0.0, "response_weight": 0.0})


@pytest.fixture
def difficulty_statistics():
    """An example-level and a span-level data statistic, registered for one test."""
    from trl_priority import register_priority
    from trl_priority.priorities import registry
    from trl_priority.statistics import DATA_STATISTICS, register_data_statistic

    register_data_statistic("difficulty", level="example", padding=0.0)
    register_data_statistic("highlight", level="span", padding=0.0)

    @register_priority(regime="soft", paper="a test")
    def by_example(difficulty, mask):
        return difficulty * mask

    @register_priority(regime="soft", paper="a test")
    def by_span(highlight, mask):
        return highlight * mask

    yield
    for name in ("by_example", "by_span"):
        registry._REGISTRY.pop(name)
    DATA_STATISTICS.pop("difficulty"), DATA_STATISTICS.pop("highlight")


def test_example_level_column_is_broadcast_to_every_token(difficulty_statistics, make_model, tokenizer, make_args):
    dataset = Dataset.from_dict(
        {"prompt": ["Tom has 3 apples. ", "Ann reads 8 pages. "], "completion": ["3 + 4 = 7", "8 * 3 = 24"],
         "difficulty": [0.5, 2.0]}
    )  # fmt: skip
    for packing in (False, True):
        args = make_args(priority="by_example", packing=packing, max_length=256 if packing else 64)
        trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
        phi = trainer.token_priorities(trainer.train_dataset.select(range(len(trainer.train_dataset))))
        labels = trainer.data_collator(list(trainer.train_dataset))["labels"][:, 1:]
        supervised = phi[labels != -100]
        assert set(supervised.tolist()) == {0.5, 2.0}
        # every completion token of an example carries its number
        assert (supervised == 0.5).sum() + (supervised == 2.0).sum() == (labels != -100).sum()


def test_spans_map_to_the_tokens_that_overlap_them(difficulty_statistics, make_model, tokenizer, make_args):
    completion = "12 + 5 = 17.\n#### 17"
    answer = completion.index("####")
    dataset = Dataset.from_dict(
        {"prompt": ["A cake costs $12 and a pie $5. What is the total? "], "completion": [completion],
         "highlight": [[[answer, len(completion), 3.0], [0, 2]]]}
    )  # fmt: skip
    trainer = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="by_span"), train_dataset=dataset, processing_class=tokenizer
    )
    row = trainer.train_dataset[0]
    phi = trainer.token_priorities(trainer.train_dataset.select([0]))[0]
    ids, mask = row["input_ids"], [int(label != -100) for label in row["labels"]]  # completion-only labels
    completion_ids = [i for i, m in zip(ids, mask) if m]
    # Independently: decode each completion token, find its characters, and look up the span it falls in
    position, expected = 0, []
    for token in completion_ids:
        piece = tokenizer.decode([token])
        start, end = position, position + len(piece)
        position = end
        if start < len(completion) and end > answer:
            expected.append(3.0)
        elif start < 2:
            expected.append(1.0)
        else:
            expected.append(0.0)
    first = mask.index(1)
    assert phi[first - 1 : first - 1 + len(completion_ids)].tolist() == expected
    assert 3.0 in expected and 1.0 in expected  # both spans landed on tokens


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("difficulty", None, "Example 1 has no value in the column 'difficulty'"),
        ("difficulty", float("nan"), "Example 1: column 'difficulty' holds one number per example"),
        ("highlight", [[5, 2]], "Example 1: column 'highlight' has the span \\[5, 2\\]"),
    ],
)
def test_bad_columns_name_the_example(difficulty_statistics, column, value, message, make_model, tokenizer, make_args):
    good = {"difficulty": 1.0, "highlight": [[0, 1]]}
    rows = [dict(good, prompt="Tom has 3 apples. ", completion="3 + 4 = 7"), dict(good, prompt="Q ", completion="A")]
    rows[1][column] = value
    dataset = Dataset.from_list(rows)
    method = "by_example" if column == "difficulty" else "by_span"
    with pytest.raises(ValueError, match=message):
        PrioritySFTTrainer(
            model=make_model(), args=make_args(priority=method), train_dataset=dataset, processing_class=tokenizer
        )


def test_a_missing_column_is_named_with_its_hint(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="reads the column 'noise'.*RobustFT reads one noise score per example"):
        PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority="robustft"),
            train_dataset=datasets_.prompt_completion(2),
            processing_class=tokenizer,
        )


def test_per_token_column_of_the_wrong_length_names_the_example():
    from trl_priority.data.columns import expand_columns
    from trl_priority.statistics import DataStatistic

    spec = {"weights": DataStatistic("weights", "token")}
    with pytest.raises(ValueError, match="Example 7: column 'weights' has 2 values but the example has 3 tokens"):
        expand_columns({"input_ids": [1, 2, 3], "weights": [1.0, 2.0]}, 7, spec)
    with pytest.raises(ValueError, match="Example 7: column 'weights' has the non-finite .* inf at token 1"):
        expand_columns({"input_ids": [1, 2, 3], "weights": [1.0, float("inf"), 0.0]}, 7, spec)
