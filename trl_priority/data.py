"""Per-token data columns that travel with the tokens: truncated, packed and padded exactly like `labels`.

TRL's `SFTTrainer` prepares `input_ids` and `labels` and drops every other column before the model sees a batch; its
truncation and packing touch only those two. A priority that reads a data statistic (`response_mask`, and later
per-token weights or spans) needs its column aligned token for token, so:

1. `prepare_token_columns` truncates and packs the token columns together with `input_ids` and `labels` (TRL's own
   `pack_dataset` packs every list column of a row the same way);
2. `TokenColumnCollator` pads them to the batch like the input ids (0 on padding), or concatenates them under
   padding-free;
3. the trainer pops them from the batch before the forward pass and shifts them by one, so that position t scores
   `labels[:, t + 1]` like every other statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import pack_dataset


def _check_aligned(example: dict[str, Any], columns: Sequence[str], index: int) -> None:
    length = len(example["input_ids"])
    for column in columns:
        if len(example[column]) != length:
            raise ValueError(
                f"Example {index}: column '{column}' has {len(example[column])} values but the example has {length} "
                f"tokens. A per-token column needs exactly one value per token of `input_ids`."
            )


def prepare_token_columns(
    dataset: Dataset | IterableDataset,
    columns: Sequence[str],
    args,
    packing: bool,
    dataset_name: str,
) -> Dataset | IterableDataset:
    """Truncate (or pack) `input_ids`, `labels` and the token `columns` together, as TRL does for the first two.

    `dataset` is tokenized with labels, neither truncated nor packed. Mirrors the truncation and packing steps of
    `SFTTrainer._prepare_dataset`, applied to the extra columns too.
    """
    map_kwargs: dict[str, Any] = {}
    if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither `num_proc` nor `desc`
        map_kwargs["num_proc"] = args.dataset_num_proc
    names = ["input_ids", "labels", *columns]

    if isinstance(dataset, Dataset):
        map_kwargs["desc"] = f"Checking per-token columns of {dataset_name} dataset"
    dataset = dataset.map(
        lambda example, index: _check_aligned(example, columns, index) or {}, with_indices=True, **map_kwargs
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
    """Wrap a collator so that per-token columns come out padded like `input_ids` (0 on padding).

    Under padding-free the base collator concatenates the examples into one row; the columns are concatenated the
    same way. The result has the shape of `batch["input_ids"]`, `(B, T)`.
    """

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    columns: tuple[str, ...]
    padding_free: bool

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        values = {column: [torch.as_tensor(example[column]) for example in examples] for column in self.columns}
        batch = self.base([{k: v for k, v in example.items() if k not in self.columns} for example in examples])
        shape = batch["input_ids"].shape  # (B, T)
        for column, rows in values.items():
            if self.padding_free:
                rows = [torch.cat(rows)]
            out = torch.zeros(shape, dtype=rows[0].dtype if rows[0].is_floating_point() else torch.long)
            for i, row in enumerate(rows):
                out[i, : row.numel()] = row
            batch[column] = out
        return batch
