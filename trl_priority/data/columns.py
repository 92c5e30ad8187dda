"""Data columns that travel with the tokens: truncated, packed and padded exactly like `labels`.

TRL's `SFTTrainer` prepares `input_ids` and `labels` and drops every other column before the model sees a batch; its
truncation and packing touch only those two. A priority that reads a data statistic (`response_mask`, a per-example
noise score, labelled spans, precomputed reference values) needs its column aligned token for token, so:

1. `prepare_token_columns` turns every column into one value per token, by its level
   (`trl_priority.statistics.DataStatistic`): a per-example number is broadcast to the example's tokens, character
   spans over the completion are mapped to the tokens that overlap them, a per-token list is checked for length and
   finite values; then it truncates and packs those columns together with `input_ids` and `labels` (TRL's own
   `pack_dataset` packs every list column of a row the same way);
2. `TokenColumnCollator` pads them to the batch like the input ids (with each statistic's padding value), or
   concatenates them under padding-free;
3. the trainer pops them from the batch before the forward pass and shifts them by one, so that position t scores
   `labels[:, t + 1]` like every other statistic.

A bad column is an error that names the example: missing, a list of the wrong length, a non-finite value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import pack_dataset
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import global_then_local_main_first

from trl_priority.statistics import DataStatistic


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float | bool) and math.isfinite(float(value))


def _completion_positions(example: Mapping[str, Any]) -> list[int]:
    """Token positions of the completion: from `completion_mask` when TRL kept it, else the supervised labels."""
    if "completion_mask" in example:
        return [i for i, bit in enumerate(example["completion_mask"]) if bit]
    return [i for i, label in enumerate(example["labels"]) if label != -100]


def completion_text(example: Mapping[str, Any], tokenizer) -> tuple[str, list[int], list[int]]:
    """The completion as the model sees it (its tokens decoded), and each completion token's character span in it:
    `(text, starts, ends)`, one start and end per completion token."""
    ids = example["input_ids"]
    completion = _completion_positions(example)
    ends = [len(tokenizer.decode([ids[i] for i in completion[: j + 1]])) for j in range(len(completion))]
    text = tokenizer.decode([ids[i] for i in completion])
    return text, [0, *ends[:-1]], ends


def word_indices(input_ids: list[int], tokenizer) -> list[int]:
    """The word each token belongs to, counted from 0 over the whole sequence.

    A token starts a new word when its text begins with whitespace, when the previous token's text ended with
    whitespace (unless it was whitespace alone), or when either is a special token; otherwise it continues the
    previous token's word. So a number the
    tokenizer splits ("1234" → "12", "34") is one word, and so is "apples." (punctuation stays with its word).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words, word, previous_text, previous_special = [], -1, "", True
    for token in input_ids:
        text = tokenizer.decode([token])
        is_special = token in special
        # whitespace alone opens the word that follows it, so it does not end one either
        after_space = previous_text[-1:].isspace() and not previous_text.isspace()
        if word < 0 or is_special or previous_special or text[:1].isspace() or after_space:
            word += 1
        words.append(word)
        previous_text, previous_special = text, is_special
    return words


def span_values(
    example: Mapping[str, Any],
    spans: Any,
    tokenizer,
    padding: float,
    index: int,
    column: str,
    enumerate_spans: bool = False,
    offsets: tuple[str, list[int], list[int]] | None = None,
):
    """One value per token: a span's value on the completion tokens that overlap `[start, end)`, else `padding`.

    Offsets are characters of the completion text as the model sees it (the decoded completion tokens; for a
    conversational dataset the assistant message's content comes first, so offsets into the content hold). With
    `enumerate_spans`, the value of the i-th span is i + 1 (span identities, for pooling Φ over spans).
    """
    if not isinstance(spans, list | tuple):
        raise ValueError(
            f"Example {index}: column '{column}' must be a list of [start, end] or [start, end, value] character "
            f"spans over the completion, got {type(spans).__name__}."
        )
    ids = example["input_ids"]
    completion = _completion_positions(example)
    _, starts, ends = offsets or completion_text(example, tokenizer)
    values = [padding] * len(ids)
    for number, span in enumerate(spans, start=1):
        ok = isinstance(span, list | tuple) and len(span) in (2, 3) and all(_finite_number(v) for v in span)
        if not ok or span[0] > span[1]:
            raise ValueError(
                f"Example {index}: column '{column}' has the span {span!r}; a span is [start, end] or [start, end, "
                "value] with finite numbers and start <= end (character offsets into the completion)."
            )
        start, end = span[0], span[1]
        value = float(number) if enumerate_spans else float(span[2]) if len(span) == 3 else 1.0
        for j, position in enumerate(completion):
            if starts[j] < end and ends[j] > start:
                values[position] = value
    return values


def expand_columns(
    example: dict[str, Any],
    index: int,
    specs: Mapping[str, DataStatistic],
    tokenizer=None,
    priority_args: Mapping[str, Any] | None = None,
) -> dict[str, list]:
    """Every column of `specs` as one value per token of `example["input_ids"]`, or an error naming the example."""
    length = len(example["input_ids"])
    out = {}
    for column, spec in specs.items():
        if column == "token_position" and spec.generated:
            out[column] = list(range(length))
            continue
        if column == "word_index" and spec.generated:
            out[column] = word_indices(example["input_ids"], tokenizer)
            continue
        if spec.compute is not None:  # made from the raw example's own fields (per-message weights)
            values = spec.compute(example, tokenizer, index, dict(priority_args or {}))
            if len(values) != length:
                raise ValueError(
                    f"Example {index}: column '{column}' was made with {len(values)} values for {length} tokens."
                )
            out[column] = [float(v) for v in values]
            continue
        if spec.derive is not None and example.get(column) is None:
            # Spans the method finds in the completion text itself (a marker, a checker's verdicts), unless the
            # dataset gives them in the column: labels given win over derivation
            offsets = completion_text(example, tokenizer)
            spans = spec.derive(offsets[0], dict(priority_args or {}))
            out[column] = span_values(example, spans, tokenizer, spec.padding, index, column, offsets=offsets)
            continue
        if column not in example or example[column] is None:
            raise ValueError(f"Example {index} has no value in the column '{column}': {spec.hint}.")
        value = example[column]
        if spec.level == "example":
            if not _finite_number(value):
                raise ValueError(
                    f"Example {index}: column '{column}' holds one number per example, got {value!r}; it must be a "
                    "finite number."
                )
            out[column] = [float(value)] * length
        elif spec.level == "span":
            out[column] = span_values(example, value, tokenizer, spec.padding, index, column, spec.enumerate_spans)
        else:
            if not isinstance(value, list | tuple) or len(value) != length:
                size = len(value) if isinstance(value, list | tuple) else type(value).__name__
                raise ValueError(
                    f"Example {index}: column '{column}' has {size} values but the example has {length} tokens. A "
                    "per-token column needs exactly one value per token of `input_ids`."
                )
            if not all(_finite_number(v) for v in value):
                bad = next(i for i, v in enumerate(value) if not _finite_number(v))
                raise ValueError(
                    f"Example {index}: column '{column}' has the non-finite or non-numeric value {value[bad]!r} at "
                    f"token {bad}."
                )
            out[column] = list(value)
    return out


def prepare_token_columns(
    dataset: Dataset | IterableDataset,
    specs: Mapping[str, DataStatistic],
    args,
    packing: bool,
    dataset_name: str,
    tokenizer=None,
    priority_args: Mapping[str, Any] | None = None,
) -> Dataset | IterableDataset:
    """Expand the columns of `specs` to one value per token, then truncate (or pack) them with the tokens.

    `dataset` is tokenized with labels, neither truncated nor packed. Mirrors the truncation and packing steps of
    `SFTTrainer._prepare_dataset`, applied to the extra columns too.
    """
    columns = list(specs)
    map_kwargs: dict[str, Any] = {}
    if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither `num_proc` nor `desc`
        map_kwargs["num_proc"] = args.dataset_num_proc
    names = ["input_ids", "labels", *columns]

    if isinstance(dataset, Dataset):
        map_kwargs["desc"] = f"Aligning per-token columns of {dataset_name} dataset"
    dataset = dataset.map(
        expand_columns,
        with_indices=True,
        fn_kwargs={"specs": dict(specs), "tokenizer": tokenizer, "priority_args": dict(priority_args or {})},
        **map_kwargs,
    )

    if args.max_length is not None and not packing:
        sl = slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Truncating {dataset_name} dataset"
        dataset = dataset.map(lambda example: {name: example[name][sl] for name in names}, **map_kwargs)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Dropping fully masked examples from {dataset_name} dataset"
        dataset = dataset.filter(lambda example: any(label != -100 for label in example["labels"]), **map_kwargs)

    if packing:
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        dataset = dataset.select_columns(names)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Packing {dataset_name} dataset"
        dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)

    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset


@dataclass
class TokenColumnCollator:
    """Wrap a collator so that per-token columns come out padded like `input_ids`.

    Under padding-free the base collator concatenates the examples into one row; the columns are concatenated the
    same way. The result has the shape of `batch["input_ids"]`, `(B, T)`, or `(B, T, k)` for a column that holds a
    vector per token (the reference cache's top-k ids and log-probabilities), padded with the same value.
    """

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    columns: tuple[str, ...]
    padding_free: bool
    padding: Mapping[str, float] = field(default_factory=dict)  # column -> value on padding (default 0)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        values = {column: [torch.as_tensor(example[column]) for example in examples] for column in self.columns}
        batch = self.base([{k: v for k, v in example.items() if k not in self.columns} for example in examples])
        shape = batch["input_ids"].shape  # (B, T)
        for column, rows in values.items():
            if self.padding_free:
                rows = [torch.cat(rows)]
            dtype = rows[0].dtype if rows[0].is_floating_point() else torch.long
            out = torch.full((*shape, *rows[0].shape[1:]), self.padding.get(column, 0.0), dtype=dtype)
            for i, row in enumerate(rows):
                out[i, : row.shape[0]] = row
            batch[column] = out
        return batch


class _ArgsOverride:
    """A read-only view of the training arguments with a few attributes replaced."""

    def __init__(self, args, **overrides):
        self._args = args
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._args, name)


def prepare_dataset_with_columns(
    prepare: Callable,
    dataset,
    processing_class,
    args,
    packing,
    formatting_func,
    dataset_name: str,
    *,
    plan,
    specs: Mapping[str, Any],
    priority,
    priority_args: Mapping[str, Any],
):
    """`SFTTrainer._prepare_dataset` (`prepare`, same arguments) for a method that reads per-token columns (`specs`,
    non-empty): TRL tokenizes and builds the labels untruncated and unpacked, then the per-token columns are cut and
    packed together with `input_ids` and `labels` (`prepare_token_columns`)."""
    if "example_index" in plan.column_specs:
        # The per-token identity of stateful methods: the example's index in the dataset as given
        with global_then_local_main_first():
            dataset = dataset.map(lambda _, index: {"example_index": index}, with_indices=True)
    # TRL truncates and packs only `input_ids` and `labels`: let it tokenize and build the labels, then cut and
    # pack the per-token columns together with them.
    untruncated = _ArgsOverride(args, max_length=None, shuffle_dataset=False)
    dataset = prepare(dataset, processing_class, untruncated, False, formatting_func, dataset_name)
    if plan.mask_prompt_labels and "completion_mask" in get_dataset_column_names(dataset):
        with global_then_local_main_first():
            dataset = dataset.map(
                lambda example: {
                    "labels": [
                        label if bit else -100 for label, bit in zip(example["labels"], example["completion_mask"])
                    ]
                }
            )
    columns = get_dataset_column_names(dataset)
    for column, spec in specs.items():
        if column not in columns and not spec.generated:
            raise ValueError(
                f"Priority '{priority.name}' reads the column '{column}', which the prepared {dataset_name} "
                f"dataset lacks (it has {columns}): {spec.hint}."
            )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    with global_then_local_main_first():
        dataset = prepare_token_columns(dataset, specs, args, packing, dataset_name, tokenizer, priority_args)
    if priority.trains_prompt(priority_args) and "completion_mask" in plan.column_specs:
        warn_truncated_completions(dataset, dataset_name, args.max_length, priority.name)
    return dataset


def warn_truncated_completions(dataset, dataset_name: str, max_length, priority_name: str) -> None:
    """A method that trains prompt tokens keeps an example whose completion was truncated away: it would train on
    the prompt alone. Say so, with the fix."""
    if not isinstance(dataset, Dataset) or "completion_mask" not in dataset.column_names:
        return
    empty = sum(1 for mask in dataset["completion_mask"] if not any(mask))
    if empty:
        warnings.warn(
            f"{empty} of {len(dataset)} {dataset_name} examples have no completion token left after truncation "
            f"to max_length={max_length}: priority '{priority_name}' trains their prompt alone. Raise "
            "`max_length`, or shorten the prompts.",
            stacklevel=4,
        )
