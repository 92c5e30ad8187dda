"""Computing the reference cache's entries: the statistics over the trainer's prepared datasets, computed
data-parallel and gathered, a piece at a time, to the processes that write the entry, and the source that reads them
back as columns (`CachedColumns`). The key and the on-disk format are `trl_priority.references.disk_cache`, whose
docstring describes the whole cache.

Slightly over 400 lines because it is one path, end to end: computing, gathering and writing an entry and reading it
back are the steps of `cache_reference_statistics`, and a split would separate a step from the only code that calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from trl_priority import statistics as stats_vocab
from trl_priority.data.columns import TokenColumnCollator
from trl_priority.references.disk_cache import (
    FORMAT_VERSION,
    TOPK_COLUMNS,
    TOPK_TAIL,
    EntryWriter,
    cache_components,
    cache_key,
    nearest_entry,
    read_entry,
    resolve_cache_dir,
)
from trl_priority.references.sources import ColumnReference, Reference
from trl_priority.references.topk import TopKReferenceDistribution, reference_topk


logger = get_logger(__name__)


# ------------------------------------------------------------------------------------------------------------------
# Computing the statistics over prepared rows
# ------------------------------------------------------------------------------------------------------------------
def _split_rows(value: torch.Tensor, lengths: Sequence[int], padding_free: bool) -> list[np.ndarray]:
    """A batch statistic `(B, T-1)` or `(B, T-1, k)` (position t scores token t + 1) as one array per row of
    `lengths[b]` values (float32, or int32 for token ids), the value at i scoring token i (0 at i = 0, which nothing
    predicts). Padding-free batches are one row of examples."""
    value = value.detach().cpu()
    dtype = np.float32 if value.is_floating_point() else np.int32
    value = value.float() if value.is_floating_point() else value
    rows, offset = [], 0
    for b, length in enumerate(lengths):
        scored = value[0, offset : offset + length - 1] if padding_free else value[b, : length - 1]
        rows.append(np.concatenate([np.zeros((1, *scored.shape[1:]), dtype), scored.numpy().astype(dtype)]))
        offset += length
    return rows


def _check_layout(batch: Mapping[str, Any], rows: Sequence[Sequence[int]], padding_free: bool) -> None:
    """The collated batch holds each row's tokens at the place `_split_rows` reads them from."""
    ids = batch["input_ids"]
    offset = 0
    for b, row in enumerate(rows):
        placed = ids[0, offset : offset + len(row)] if padding_free else ids[b, : len(row)]
        offset += len(row)
        if placed.tolist() != list(row):
            raise RuntimeError(
                "The data collator does not place each row's tokens at the start of its batch row (right padding) "
                "or one after the other (padding-free), so the reference cache cannot map its values back to the "
                "rows. Use TRL's collator, or unset `ref_cache_dir`."
            )


def compute_reference_columns(
    trainer,
    reference: Reference,
    dataset: Dataset,
    names: Sequence[str],
    collator,
    description: str,
    topk: int | None = None,
    sink: EntryWriter | None = None,
) -> None:
    """`{"ref_<name>": one float32 array per row}` over every row of `dataset`, computed data-parallel: each process
    scores a shard (longest rows first, so batches pad little), and the shards are gathered, in pieces, on the
    processes that write the entry, each piece added to their `sink` as it arrives (the others pass None). With
    `topk`, also `ref_topk_ids` / `ref_topk_logps`, one `(length, k)` array per row (`reference_topk`)."""
    args, accelerator = trainer.args, trainer.accelerator
    batch_size = args.ref_cache_batch_size or args.per_device_eval_batch_size
    trainer._set_signature_columns_if_needed()
    keep = [c for c in trainer._signature_columns if c in dataset.column_names and c not in trainer._token_columns]
    rows = dataset.select_columns(keep)
    lengths = pc.list_value_length(rows.with_format("arrow")[:]["input_ids"]).to_numpy(zero_copy_only=False)
    order = np.argsort(-lengths, kind="stable").tolist()
    # Every process gets as many rows (the last repeated), so sharded references run in lockstep
    with accelerator.split_between_processes(order, apply_padding=True) as mine:
        mine = list(mine)
    policy = trainer.model
    values: dict[int, dict[str, np.ndarray]] = {}
    bar = tqdm(
        total=len(mine),
        desc=description,
        unit="row",
        disable=not accelerator.is_local_main_process or args.disable_tqdm,
    )
    context = contextlib.ExitStack()
    context.enter_context(torch.no_grad())
    context.enter_context(accelerator.autocast())  # the training forward's mixed precision
    with context:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            columns = rows[chunk]
            examples = [dict(zip(columns, row)) for row in zip(*columns.values())]
            batch = collator(examples)
            _check_layout(batch, columns["input_ids"], trainer.padding_free)
            inputs = trainer._prepare_inputs(dict(batch))
            inputs["use_cache"] = False
            statistics, distribution = reference.statistics(
                policy, inputs, names, trainer.priority_args, distribution=topk is not None
            )
            mask = inputs["labels"][:, 1:] != -100  # (B, T-1)
            if topk is not None:
                if not isinstance(distribution, stats_vocab.ReferenceDistribution):
                    raise ValueError(
                        f"The reference ({reference.description}) gives no next-token distribution, which the top-k "
                        "cache is computed from. Use a reference model (`ref_model=`, `ref_model_name_or_path`, or "
                        "none for the starting model), or unset `ref_cache_dir`."
                    )
                statistics = reference_topk(distribution, inputs["labels"], names, trainer.priority_args, topk)
            row_lengths = [len(ids) for ids in columns["input_ids"]]
            split = {}
            for key, value in statistics.items():
                supervised = mask.view(*mask.shape, *(1,) * (value.dim() - 2))  # (B, T-1) or (B, T-1, 1)
                split[key] = _split_rows(torch.where(supervised, value, 0), row_lengths, trainer.padding_free)
            for j, index in enumerate(chunk):
                values[index] = {key: split[key][j] for key in split}
            bar.update(len(chunk))
    bar.close()
    gather_to_writers(values, mine, None if sink is None else sink.add, accelerator.num_processes)


GATHER_PIECE_ROWS = 256  # rows of values sent in one message when the shards are gathered to the writers


def gather_to_writers(
    values: dict[int, Any],
    mine: Sequence[int],
    receive: Callable[[dict[int, Any]], None] | None,
    num_processes: int,
    piece_rows: int | None = None,
) -> None:
    """Hand every process's `{row: values}` to `receive` on the processes that write the entry (those that pass one),
    a piece at a time.

    Each writer receives the shards one piece of `piece_rows` rows per process at a time
    (`torch.distributed.gather_object` to that writer) and hands each process's part to `receive` as it arrives, so
    no process other than a writer ever holds another's values, no message holds more than a piece, and a writer
    that writes each part at once (`EntryWriter.add`) never holds more than one gathered piece of the others'
    values. `mine` (this process's rows, as many on every process) gives the pieces' order.
    """
    piece_rows = piece_rows or GATHER_PIECE_ROWS
    if num_processes == 1:
        if receive is not None:
            for start in range(0, len(mine), piece_rows):
                receive({index: values[index] for index in mine[start : start + piece_rows]})
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    flags = [None] * num_processes
    dist.all_gather_object(flags, receive is not None)  # who writes: the main process, or each node's
    writers = [r for r, is_writer in enumerate(flags) if is_writer]
    for start in range(0, len(mine), piece_rows):
        piece = {index: values[index] for index in mine[start : start + piece_rows]}
        for destination in writers:
            received = [None] * num_processes if rank == destination else None
            dist.gather_object(piece, received, dst=destination)
            if rank == destination:
                for part in received:
                    receive(part)
                del received


# ------------------------------------------------------------------------------------------------------------------
# The trainer's entry point
# ------------------------------------------------------------------------------------------------------------------
class CachedColumns(ColumnReference):
    """The reference statistics read from the columns that `precompute_reference_statistics` attached to the rows.

    With `topk` (a method reading the reference's whole distribution), the distribution is the cached top-k columns,
    returned as a `TopKReferenceDistribution` for the policy's chunked pass (`trl_priority.references.topk`); the
    statistics `names` are read from their exact columns.
    """

    kind = "disk_cache"

    def __init__(self, root: str, topk: int | None = None, identity: Mapping[str, Any] | None = None):
        self.topk = topk
        self._cached_identity = identity
        what = "statistics" if topk is None else f"statistics and top-{topk} distribution"
        self.description = f"{what} cached in {root} (no reference forward)"

    def identity(self) -> dict[str, Any] | None:
        """The identity of the source whose values are cached (`priority.json` records it: a resume must read the
        same values)."""
        return self._cached_identity

    def statistics(self, policy, inputs, names, args, columns=None, distribution=False):
        wanted = [f"ref_{name}" for name in names]
        if distribution:
            if self.topk is None:
                raise ValueError(
                    "The cached reference statistics hold no distribution, which this method's loss reads. Rebuild "
                    "the trainer with `ref_cache_dir`, which caches the top-k distribution for such methods."
                )
            wanted += ["ref_logps", *TOPK_COLUMNS]
        missing = [column for column in dict.fromkeys(wanted) if column not in (columns or {})]
        if missing:
            raise ValueError(
                f"The batch has no column {missing}: the reference statistics were cached for the datasets the "
                "trainer was built with, and the reference model was freed. Collate rows of `trainer.train_dataset` "
                "or `trainer.eval_dataset`, or build a trainer with this dataset (and `ref_cache_dir`) to evaluate it."
            )
        statistics, _ = super().statistics(policy, inputs, names, args, columns, distribution)
        if not distribution:
            return statistics, None
        mask = inputs["labels"][:, 1:] != -100  # (B, T-1)
        reference = TopKReferenceDistribution(
            ids=columns["ref_topk_ids"][:, 1:].to(mask.device).long(),  # (B, T-1, k)
            logps=columns["ref_topk_logps"][:, 1:].to(mask.device).float(),  # (B, T-1, k)
            label_logps=columns["ref_logps"][:, 1:].to(mask.device).float(),  # (B, T-1)
        )
        return statistics, reference


@dataclasses.dataclass
class CacheEntry:
    """One dataset's cache entry, as used by a trainer (`trainer.ref_cache_entries`)."""

    dataset: str  # "train", "eval" or an evaluation dataset's name
    key: str
    path: str
    reused: bool
    rows: int
    seconds: float  # computing (and writing) it; 0 when reused
    differences: list[str] | None = None  # how the nearest existing entry differed, when computed


def _main_value(accelerator, compute: Callable[..., Any], *args) -> Any:
    """`compute(*args)` on the main process, the same value on every process."""
    value = [compute(*args) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(value)
    return value[0]


def _entry_exists(*args) -> bool:
    return read_entry(*args) is not None


@dataclasses.dataclass
class CachedReference:
    """What `cache_reference_statistics` gives the trainer to install: the source that reads the cached columns, the
    entries, and the datasets with the columns attached (as the trainer holds them: `eval_dataset` a dataset, a dict
    of them, or None)."""

    reference: CachedColumns
    entries: list[CacheEntry]
    train_dataset: Dataset
    eval_dataset: Any
    root: str


def cache_reference_statistics(trainer, source: Reference | None, cache_dir: str | None = None) -> CachedReference:
    """Compute the reference statistics `trainer.plan` caches once over the trainer's prepared datasets with `source`
    (loaded only on a miss), store them under `cache_dir/<key>/` (or reuse a matching entry), and return the source
    that reads them as columns, with the datasets that carry them. Assigns nothing on the trainer, which installs the
    result (`PrioritySFTTrainer.precompute_reference`). Every process must call it (each computes a shard of a
    missing entry; the main process writes it, the others wait)."""
    plan = trainer.plan
    names = plan.cached_statistics
    if not names:
        raise ValueError(f"Priority '{plan.priority}' reads no reference statistics: there is nothing to precompute.")
    topk = plan.cache_topk
    if isinstance(source, ColumnReference):
        raise ValueError("The trainer already reads its reference statistics from columns: nothing to precompute.")
    if getattr(trainer, "_is_vision_dataset", False):
        raise ValueError("`ref_cache_dir` needs tokenized rows; vision datasets are prepared batch by batch.")
    root = resolve_cache_dir(cache_dir or trainer.args.ref_cache_dir or "auto")
    accelerator = trainer.accelerator
    collator = trainer.data_collator
    base_collator = collator.base if isinstance(collator, TokenColumnCollator) else collator
    columns = [f"ref_{name}" for name in names] + (list(TOPK_COLUMNS) if topk is not None else [])

    datasets = {"train": trainer.train_dataset}
    evaluation = trainer.eval_dataset
    if isinstance(evaluation, Mapping):
        datasets.update(evaluation)
    elif evaluation is not None:
        datasets["eval"] = evaluation
    for name, dataset in datasets.items():
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"`ref_cache_dir` caches map-style datasets; the {name} dataset is a {type(dataset).__name__}. Load it "
                "without streaming, or unset `ref_cache_dir`."
            )

    identity, entries, attached = None, [], {}
    for name, dataset in datasets.items():
        if identity is None:
            # Every process hashes (partitioned weights are hashed shard by shard, together); the main one's counts
            identity = _main_value(accelerator, lambda given: given, source.identity())
        components, lengths = cache_components(trainer, dataset, names, identity, eval_dataset=name != "train")
        components = _main_value(accelerator, lambda given: given, components)
        key = cache_key(components)
        path = os.path.join(root, key)
        found = _main_value(accelerator, _entry_exists, path, key, columns, lengths)
        entry = CacheEntry(name, key, path, reused=found, rows=len(dataset), seconds=0.0)
        if not found:
            entry.differences = _main_value(accelerator, nearest_entry, root, components)
            start = time.perf_counter()
            reference = source.load()
            writer = accelerator.is_main_process or (
                trainer.args.save_on_each_node and accelerator.is_local_main_process
            )
            description = f"Reference statistics of the {name} dataset"
            sink = EntryWriter(root, key, columns, len(dataset)) if writer else None
            try:
                compute_reference_columns(trainer, reference, dataset, names, base_collator, description, topk, sink)
            except BaseException:
                if sink is not None:
                    sink.abort()
                raise
            if sink is not None:
                meta = {
                    "format": FORMAT_VERSION,
                    "key": key,
                    "components": components,
                    "columns": {column: _column_kind(column, topk) for column in columns},
                    "num_rows": len(dataset),
                    "num_tokens": int(lengths.sum()),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                sink.finish(meta)
            accelerator.wait_for_everyone()
            entry.seconds = time.perf_counter() - start
        cached = read_entry(path, key, columns, lengths)
        if cached is None:
            raise RuntimeError(
                f"Process {accelerator.process_index} cannot read the reference cache entry {path} that the main "
                "process wrote. Put `ref_cache_dir` on a filesystem every node reads, or set `save_on_each_node`."
            )
        dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
        if dataset._indices is not None:
            # Side by side, both tables must be in row order: flatten the rows' own (`concatenate_datasets` would
            # flatten both, writing a copy of the entry into the cache folder on every read)
            dataset = dataset.flatten_indices()
        attached[name] = concatenate_datasets([dataset, cached], axis=1)
        entries.append(entry)
        _log_entry(trainer, entry, [column.removeprefix("ref_") for column in columns])

    train_dataset = attached.pop("train")
    if isinstance(evaluation, Mapping):
        evaluation = attached
    elif evaluation is not None:
        evaluation = attached["eval"]
    return CachedReference(CachedColumns(root, topk, identity), entries, train_dataset, evaluation, root)


def precompute_reference_statistics(trainer, cache_dir: str | None = None) -> list[CacheEntry]:
    """Compute the reference statistics the trainer's method reads once over its prepared datasets, store them under
    `cache_dir/<key>/` (or reuse a matching entry), and from then on read them as columns: no reference forward.

    Args:
        trainer: a `PrioritySFTTrainer` whose method reads reference statistics.
        cache_dir: the cache folder; defaults to `trainer.args.ref_cache_dir`, then `"auto"` (`default_cache_dir()`).

    Returns:
        One `CacheEntry` per dataset (train, then each evaluation dataset), also in `trainer.ref_cache_entries`.

    The training and evaluation rows get the columns `ref_<name>`, the trainer's reference becomes `CachedColumns`
    (a `ColumnReference`), and the model reference is freed: `trainer.precompute_reference(cache_dir)`, which
    installs what `cache_reference_statistics` returns. Every process must call it.
    """
    return trainer.precompute_reference(cache_dir)


def _column_kind(column: str, topk: int | None) -> dict[str, Any]:
    """A cached column as `meta.json` describes it."""
    if column in TOPK_COLUMNS:
        dtype = "int32" if column == "ref_topk_ids" else "float32"
        return {"level": "token", "dtype": dtype, "shape": [topk], "tail": TOPK_TAIL}
    return {"level": "token", "dtype": "float32"}


def _log_entry(trainer, entry: CacheEntry, names: Sequence[str]) -> None:
    what = f"trl-priority: reference statistics {list(names)} of the {entry.dataset} dataset ({entry.rows} rows)"
    if entry.reused:
        message = f"{what} reused from {entry.path}: no reference forward."
    else:
        if entry.differences is None:
            why = "no cached entry yet"
        elif not entry.differences:
            why = "the entry with this key was incomplete or corrupt"
        else:
            why = "the nearest cached entry differs in " + "; ".join(entry.differences[:4])
        message = f"{what} computed in {entry.seconds:.1f}s ({why}) and stored in {entry.path}."
    logger.info(message, main_process_only=True)
    trainer.accelerator.print(message)


__all__ = [
    "CacheEntry",
    "CachedColumns",
    "CachedReference",
    "cache_reference_statistics",
    "compute_reference_columns",
    "gather_to_writers",
    "precompute_reference_statistics",
]
