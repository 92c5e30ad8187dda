"""Per-token data columns (here WIT's response mask) through truncation, padding, padding-free and packing."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_priority import PrioritySFTTrainer
from trl_priority.data import TokenColumnCollator


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
