"""Reference statistics paid once: a cache on disk keyed by everything they depend on, and a lazy per-token cache.

A method that reads reference statistics (`ref_logps`, `ref_mass`, ...) runs the frozen reference on every batch of
every epoch, although its values never change. Two ways to pay for them once:

1. **`ref_cache_dir`** (`precompute_reference_statistics`, `trl-priority precompute-ref`). Before training, the
   statistics the method reads are computed over the *prepared* rows (`trainer.train_dataset` after TRL's
   tokenization, truncation and packing, so the values are those the trainer would compute under padding,
   padding-free and packing), stored under `ref_cache_dir/<key>/`, and attached to the rows as per-token columns
   `ref_<name>` (value at i scores token i, the `precomputed_ref_columns` layout). Training reads them through a
   `ColumnReference`: no reference forward, and the reference model is freed. The key hashes

   | component   | what                                                                                       |
   |-------------|--------------------------------------------------------------------------------------------|
   | dataset     | the prepared rows' content: `input_ids`, `labels` and the position columns, in row order    |
   | tokenizer   | its vocabulary (token → id)                                                                |
   | reference   | a path's weight and config files (size, mtime), a hub id's cached commit, an in-memory      |
   |             | model's parameters (a strided sample and the float64 sum of each tensor), a callback's name |
   |             | and its `cache_identity` attribute; the loading kwargs and quantization                    |
   | settings    | max_length, truncation_mode, packing (strategy, eval_packing), padding_free,               |
   |             | pad_to_multiple_of, mixed precision                                                        |
   | statistics  | their names, and the hyperparameters they are computed with (`hyperparameters_of`)          |

   `datasets`' own `_fingerprint` is not used for the dataset: for an in-memory dataset it is a hash of the
   Python objects or, when a transform cannot be pickled, a random value (`update_fingerprint` falls back to
   `generate_random_fingerprint`), and it hashes a transform's code, not the rows it produced.

   An entry is `<key>/data/` (an Arrow dataset, `Dataset.save_to_disk`, one `list<float32>` column per statistic,
   one row per prepared row) and `<key>/meta.json` (the components, the columns and their kind, written last). It
   is written into a hidden temporary sibling and moved into place with `os.replace` once complete, so an
   interrupted write leaves nothing that looks like an entry; an entry that fails to load is ignored and
   recomputed.

   Methods whose loss reads the reference's whole next-token distribution (`asft`, `target_sft` with a reference
   prior or trust) cache it as its top k tokens per position (`ref_cache_topk`, default 64): the columns
   `ref_topk_ids` (`list<fixed_size_list<int32, k>>`) and `ref_topk_logps` (`list<fixed_size_list<float32, k>>`),
   next to the exact `ref_logps` of the label, 8·k + 4 bytes per token. They are computed from the reference's
   final hidden states through its LM head a chunk of supervised positions at a time (never `(B, T, V)` logits),
   and training passes them as a `TopKReferenceDistribution` to the chunked distribution pass, which rebuilds each
   chunk's distribution with the tail shaped like the policy's (`trl_priority.references.topk`). k and the tail rule
   are part of the key (`components["distribution"]`).

2. **The lazy epoch cache** (`ref_epoch_cache`), for runs without `ref_cache_dir`: `trl_priority.references.epoch_cache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets.table import InMemoryTable
from tqdm.auto import tqdm

from trl_priority import statistics as stats_vocab
from trl_priority.data.columns import TokenColumnCollator
from trl_priority.references.sources import ColumnReference, Reference
from trl_priority.references.topk import TopKReferenceDistribution, topk_of
from trl_priority.statistics import lm_head


logger = get_logger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
DATA_DIR = "data"
CACHE_ENV = "TRL_PRIORITY_CACHE"  # overrides the default cache folder of `ref_cache_dir="auto"`
# Files of a model folder that change when its weights or its loading change
_MODEL_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")
# Columns of a prepared row that the reference's values depend on (the rest is text or other statistics)
_CONTENT_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths", "attention_mask")
# The top-k cache of the reference's distribution: (k,) ids and log-probabilities per token
TOPK_COLUMNS = ("ref_topk_ids", "ref_topk_logps")
# How the tail mass beyond the k cached tokens is shared at training time (`TopKRows.logprobs`): like the policy's
TOPK_TAIL = "policy"


# ------------------------------------------------------------------------------------------------------------------
# Which runs cache
# ------------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    """`$TRL_PRIORITY_CACHE`, else `$XDG_CACHE_HOME/trl-priority/ref` (`~/.cache/trl-priority/ref`): shared by every
    run of the user, which is safe because an entry's key covers everything its values depend on."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "trl-priority", "ref")


def resolve_cache_dir(value: str) -> str:
    """`"auto"` is `default_cache_dir()`; any other value is a folder (`~` expanded)."""
    return default_cache_dir() if value == "auto" else os.path.expanduser(value)


def cached_statistics(priority, priority_args: Mapping[str, Any]) -> tuple[str, ...]:
    """The reference statistics a configuration reads that a cache holds (without `ref_`), or () when it reads none.
    A method reading the reference's whole distribution always caches `logps` (the label's, exact), next to the
    top-k columns (`cached_topk`)."""
    if priority is None or not priority.reference_used(priority_args):
        return ()
    names = priority.reference_statistics_for(priority_args)
    return tuple(dict.fromkeys(("logps", *names))) if priority.needs_reference_distribution else names


def cached_topk(args, priority, priority_args: Mapping[str, Any]) -> int | None:
    """k of the top-k columns a cache holds for this configuration (`ref_cache_topk`), or None when its method does
    not read the reference's whole distribution."""
    if priority is None or not priority.reference_used(priority_args) or not priority.needs_reference_distribution:
        return None
    return int(args.ref_cache_topk)


def scheduled_statistic_hyperparameters(args, priority, priority_args: Mapping[str, Any]) -> list[str]:
    """The hyperparameters of the cached reference statistics that `priority_schedule` moves: values computed with
    them once are wrong later in the run (neither cache takes them)."""
    return [
        hp
        for name in cached_statistics(priority, priority_args)
        for hp in stats_vocab.hyperparameters_of(name)
        if hp in (args.priority_schedule or {})
    ]


def cache_dir_for(args, priority, priority_args: Mapping[str, Any]) -> str | None:
    """The folder this run caches its reference statistics in, or None (checked before any model is loaded)."""
    if args.ref_cache_dir is None:
        return None
    if args.precomputed_ref_columns:
        raise ValueError(
            "`ref_cache_dir` and `precomputed_ref_columns=True` both provide the reference statistics. Set one: "
            "`ref_cache_dir` computes the columns once with the reference, `precomputed_ref_columns` reads yours."
        )
    name = getattr(priority, "name", None)
    if priority is None or not priority.reference_used(priority_args):
        logger.warning(f"Priority '{name}' reads no reference statistics; `ref_cache_dir` is ignored.")
        return None
    scheduled = scheduled_statistic_hyperparameters(args, priority, priority_args)
    if scheduled:
        raise ValueError(
            f"`priority_schedule` moves {scheduled}, which the cached reference statistics are computed with, so "
            "they cannot be computed once. Leave them fixed, or unset `ref_cache_dir`."
        )
    return resolve_cache_dir(args.ref_cache_dir)


# ------------------------------------------------------------------------------------------------------------------
# The key
# ------------------------------------------------------------------------------------------------------------------
def _update_with_array(hasher, array: pa.Array) -> None:
    """Hash an Arrow array by value (list lengths, then flattened values as int64/float64), so that the same rows
    hash the same whatever their chunking, slicing or integer width."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        hasher.update(pc.list_value_length(array).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
        array = pc.list_flatten(array)
    values = array.fill_null(0).to_numpy(zero_copy_only=False)
    hasher.update(values.astype(np.float64 if values.dtype.kind == "f" else np.int64).tobytes())


def dataset_digest(dataset: Dataset, batch_size: int = 8192) -> tuple[dict[str, Any], np.ndarray]:
    """`({"sha256", "rows", "columns"}, lengths)`: the hash of the prepared rows' content, in row order (an indices
    mapping from shuffling or filtering is followed), and each row's number of tokens."""
    columns = [c for c in _CONTENT_COLUMNS if c in dataset.column_names]
    hasher = hashlib.sha256(json.dumps([len(dataset), columns]).encode())
    lengths = []
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=batch_size):
        for column in columns:
            _update_with_array(hasher, batch.column(column))
        lengths.append(pc.list_value_length(batch.column("input_ids")).to_numpy(zero_copy_only=False))
    lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, dtype=np.int64)
    return {"sha256": hasher.hexdigest(), "rows": len(dataset), "columns": columns}, lengths


def tokenizer_identity(processing_class) -> dict[str, Any]:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return {"class": type(tokenizer).__name__, "vocab_sha256": digest, "size": len(vocab)}


def path_identity(path: str, revision: str | None = None) -> dict[str, Any]:
    """A model folder's weight and config files (name, size, mtime), or a hub id's cached commit."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = {}
        for name in sorted(os.listdir(expanded)):
            full = os.path.join(expanded, name)
            if os.path.isfile(full) and name.endswith(_MODEL_FILES):
                stat = os.stat(full)
                files[name] = [stat.st_size, stat.st_mtime_ns]
        return {"path": os.path.realpath(expanded), "files": files}
    if os.path.isfile(expanded):
        stat = os.stat(expanded)
        return {"path": os.path.realpath(expanded), "files": {"": [stat.st_size, stat.st_mtime_ns]}}
    from huggingface_hub import try_to_load_from_cache

    with contextlib.suppress(Exception):  # not a valid repo id: identified by its name alone
        found = try_to_load_from_cache(path, "config.json", revision=revision)
        if isinstance(found, str):  # .../snapshots/<commit>/config.json
            return {"hub": path, "commit": os.path.basename(os.path.dirname(found))}
    return {"hub": path, "revision": revision or "main"}


def _local_values(tensor: torch.Tensor) -> torch.Tensor | None:
    """The values of a weight this process holds: the whole tensor, its ZeRO-3 partition (`ds_tensor`: the parameter
    itself is then empty), or its FSDP2 `DTensor` local shard; None on the meta device."""
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3: the parameter is a 0-element placeholder
        tensor = tensor.ds_tensor
    elif hasattr(tensor, "to_local") and hasattr(tensor, "placements"):  # torch DTensor (FSDP2)
        tensor = tensor.to_local()
    if tensor.device.type == "meta":
        return None
    return tensor.detach().reshape(-1)


def _is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_tensor") or (hasattr(tensor, "to_local") and hasattr(tensor, "placements"))


def module_fingerprint(module: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False) -> str:
    """A cheap hash of a model's weights: each tensor's name, dtype and full shape, 4096 strided values and the
    float64 sum of the values this process holds (one pass over the weights, no copy of them).

    Partitioned weights (DeepSpeed ZeRO-3's `ds_tensor`, FSDP2's `DTensor` shards) are hashed by their local part;
    every process then hashes its own parts and the per-process digests are combined in rank order (a collective:
    every process calls this together, as `precompute_reference_statistics` does). What the sample and the sums can
    miss is in docs/reference_cache.md ("What the weights' hash can miss").
    """
    hasher = hashlib.sha256()
    partitioned = False
    with torch.no_grad():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if skip(name):
                continue
            shape = tuple(getattr(tensor, "ds_shape", tensor.shape))  # the full shape under ZeRO-3
            hasher.update(f"{name}:{tensor.dtype}:{shape}".encode())
            partitioned = partitioned or _is_partitioned(tensor)
            flat = _local_values(tensor)
            if flat is None or flat.numel() == 0:
                continue
            sample = flat[:: max(1, flat.numel() // 4096)][:4096]
            hasher.update(sample.float().cpu().numpy().tobytes())
            hasher.update(repr(flat.sum(dtype=torch.float64).item()).encode())
    digest = hasher.hexdigest()
    if partitioned and torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, digest)  # one short string per process
        digest = hashlib.sha256("".join(everyone).encode()).hexdigest()
    return digest


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return str(value)


def reference_loading(model: torch.nn.Module, init_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dtype and attention implementation a reference runs with: those of its loading kwargs, else the ones it
    copies from `model` (`loading.load_like_policy`: a reference loaded from a path takes the policy's;
    the adapter-off base and the starting model are the policy's). float32 and bfloat16 runs get other values."""
    init_kwargs = init_kwargs or {}
    causal_lm = stats_vocab.causal_lm_of(model)
    dtype = init_kwargs.get("dtype", init_kwargs.get("torch_dtype")) or getattr(causal_lm, "dtype", None)
    attention = init_kwargs.get("attn_implementation") or getattr(
        getattr(causal_lm, "config", None), "_attn_implementation", None
    )
    return {"dtype": str(dtype).removeprefix("torch."), "attn_implementation": attention}


def callback_identity(fn: Callable) -> dict[str, Any]:
    """A callback reference's identity: its qualified name and its `cache_identity` attribute."""
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    return {"kind": "callback", "name": name, "cache_identity": _jsonable(getattr(fn, "cache_identity", None))}


def path_reference_identity(
    kind: str,
    path: str,
    init_kwargs: Mapping[str, Any],
    quantization_config: Any,
    policy: torch.nn.Module,
    loading_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A reference loaded from `path` (a separate model, or the starting model under or without an adapter): the
    path's files or hub commit, how it is loaded, and the dtype and attention it runs with (`reference_loading` of
    `policy` with `loading_kwargs`)."""
    return {
        "kind": kind,
        **path_identity(path, init_kwargs.get("revision")),
        "init_kwargs": _jsonable(init_kwargs),
        "quantization": _jsonable(quantization_config),
        "loaded_as": reference_loading(policy, loading_kwargs),
    }


def weights_identity(
    kind: str, module: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False
) -> dict[str, Any]:
    """A reference in memory: a fingerprint of its weights (`module_fingerprint`, collective when partitioned) and
    the dtype and attention it runs with."""
    return {"kind": kind, "parameters": module_fingerprint(module, skip=skip), "loaded_as": reference_loading(module)}


def cache_components(
    trainer, dataset: Dataset, names: Sequence[str], reference: dict[str, Any], eval_dataset: bool
) -> tuple[dict[str, Any], np.ndarray]:
    """Everything the cached values of `dataset` depend on (the entry's `meta.json["components"]`), and its rows'
    lengths."""
    args = trainer.args
    digest, lengths = dataset_digest(dataset)
    packing = args.packing if not eval_dataset or args.eval_packing is None else args.eval_packing
    settings = {
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "packing": packing,
        "packing_strategy": args.packing_strategy,
        "padding_free": trainer.padding_free,
        "pad_to_multiple_of": args.pad_to_multiple_of,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
    }
    step_args = trainer.priority_args
    statistics = {name: {hp: step_args[hp] for hp in stats_vocab.hyperparameters_of(name)} for name in names}
    components = {
        "format": FORMAT_VERSION,
        "dataset": digest,
        "tokenizer": tokenizer_identity(trainer.processing_class),
        "reference": reference,
        "settings": settings,
        "statistics": statistics,
    }
    topk = cached_topk(args, trainer.priority, trainer.priority_args)
    if topk is not None:  # only then: the keys of the entries of other methods stay as they were
        components["distribution"] = {"topk": topk, "tail": TOPK_TAIL}
    return _jsonable(components), lengths


def cache_key(components: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:32]


def _differences(new: Any, old: Any, prefix: str = "") -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        keys = sorted(set(new) | set(old))
        return [d for k in keys for d in _differences(new.get(k), old.get(k), f"{prefix}{k}.")]
    if new == old:
        return []
    return [f"{prefix[:-1]} {_short(old)} → {_short(new)}"]


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
        return value[:8] + "…"  # a digest: its start tells entries apart
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _nearest_entry(root: str, components: Mapping[str, Any]) -> list[str] | None:
    """How the closest complete entry of `root` differs from `components` (for the log), or None if there is none."""
    best = None
    for name in os.listdir(root) if os.path.isdir(root) else []:
        meta = _read_meta(os.path.join(root, name))
        if meta is not None and "components" in meta:
            differences = _differences(components, meta["components"])
            if best is None or len(differences) < len(best):
                best = differences
    return best


# ------------------------------------------------------------------------------------------------------------------
# Entries on disk
# ------------------------------------------------------------------------------------------------------------------
def _read_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, META_FILE)) as file:
            meta = json.load(file)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def read_entry(path: str, key: str, columns: Sequence[str], lengths: np.ndarray) -> Dataset | None:
    """The cached columns of a complete, valid entry, or None (missing, interrupted, corrupt: recomputed)."""
    if not os.path.isdir(path):
        return None
    meta = _read_meta(path)
    problem = None
    if meta is None:
        problem = f"no readable {META_FILE}"
    elif meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        problem = f"format {meta.get('format')} and key {meta.get('key')}, expected {FORMAT_VERSION} and {key}"
    else:
        try:
            data = load_from_disk(os.path.join(path, DATA_DIR))
            missing = [c for c in columns if c not in data.column_names]
            if missing or len(data) != len(lengths):
                problem = f"{len(data)} rows with columns {data.column_names}"
            else:  # every row holds one value per token
                for column in columns:
                    stored = pc.list_value_length(data.data.column(column)).to_numpy(zero_copy_only=False)
                    if not np.array_equal(stored.astype(np.int64), lengths):
                        problem = f"column {column} does not match the rows' lengths"
        except Exception as error:  # an unreadable Arrow file: whatever `datasets` raises
            problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        logger.warning(f"Ignoring the incomplete or corrupt reference cache entry {path} ({problem}); recomputing it.")
        return None
    return data.select_columns(list(columns))


def _write_meta(path: str, meta: Mapping[str, Any]) -> None:
    with open(os.path.join(path, META_FILE), "w") as file:
        json.dump(meta, file, indent=2, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())


STALE_TEMPORARY_SECONDS = 24 * 3600  # a temporary folder this old is a dead writer's, whichever host it was on


def _temporary_prefix(key: str) -> str:
    """`.KEY.tmp-HOST-PID-`: a writer's temporary folder names its host and process, so a later writer can tell
    whether it is still alive (`remove_stale_temporaries`)."""
    return f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _writer_is_dead(name: str) -> bool:
    """Whether the temporary folder `name` was left by a process of this host that no longer runs."""
    host_pid = name.split(".tmp-", 1)[1].rsplit("-", 1)[0] if ".tmp-" in name else ""
    host, _, pid = host_pid.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's (or an older version's) writer: only its age tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(root: str, max_age: float = STALE_TEMPORARY_SECONDS) -> list[str]:
    """Remove the temporary folders of interrupted writes under `root`: those whose writer (a process of this host)
    is dead, and any older than `max_age` seconds. Returns the names removed."""
    removed = []
    now = time.time()
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not (name.startswith(".") and ".tmp-" in name and os.path.isdir(path)):
            continue
        with contextlib.suppress(OSError):
            if _writer_is_dead(name) or now - os.path.getmtime(path) > max_age:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    return removed


def _rows_table(columns: Mapping[str, Sequence[np.ndarray]]) -> pa.Table:
    """One list column per statistic, one row per array: offsets and values, no Python numbers."""
    arrays = {}
    for column, rows in columns.items():
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in rows], out=offsets[1:])
        # float32 values, or int32 token ids; a row of shape (L, k) is L fixed-size lists of k
        dtype = np.int32 if len(rows) and rows[0].dtype.kind in "iu" else np.float32
        width = rows[0].shape[1] if len(rows) and rows[0].ndim == 2 else None
        values = np.concatenate(rows).astype(dtype).reshape(-1) if len(rows) else np.zeros(0, dtype)
        values, item = pa.array(values), pa.from_numpy_dtype(dtype)
        if width is not None:
            values, item = pa.FixedSizeListArray.from_arrays(values, width), pa.list_(item, width)
        arrays[column] = pa.LargeListArray.from_arrays(pa.array(offsets), values).cast(pa.list_(item))
    return pa.table(arrays)


class EntryWriter:
    """Writes one entry as its rows arrive, in any order and in pieces, holding no more than the piece at hand.

    Each piece (`add({row: {column: array}})`) is appended at once to an Arrow stream file in the entry's temporary
    folder, in arrival order; `finish` writes the entry's `data/` in row order from that file, memory-mapped, a
    batch at a time (`Dataset.select(...).save_to_disk`), removes it, writes `meta.json` last and moves the folder
    into place (`write_entry`'s protocol). `abort` (or an exception in `finish`) removes the temporary folder.
    """

    def __init__(self, root: str, key: str, columns: Sequence[str], num_rows: int):
        self.root, self.key, self.columns, self.num_rows = root, key, list(columns), num_rows
        os.makedirs(root, exist_ok=True)
        remove_stale_temporaries(root)
        self.temporary = tempfile.mkdtemp(prefix=_temporary_prefix(key), dir=root)
        self._arrival_path = os.path.join(self.temporary, "arrival.arrow")
        self._file, self._stream = None, None  # opened with the first piece, whose schema every piece shares
        self._position = np.full(num_rows, -1, dtype=np.int64)  # entry row i: its place in the arrival file
        self._lengths = np.zeros(num_rows, dtype=np.int64)
        self._arrived = 0

    def add(self, piece: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        # Processes get as many rows each (the last one repeated): a row already written is skipped
        rows = [index for index in piece if self._position[index] < 0]
        if not rows:
            return
        table = _rows_table({column: [piece[index][column] for index in rows] for column in self.columns})
        if self._stream is None:
            self._file = pa.OSFile(self._arrival_path, "wb")
            self._stream = pa.ipc.new_stream(self._file, table.schema)
        self._stream.write_table(table)
        self._position[rows] = np.arange(self._arrived, self._arrived + len(rows))
        self._lengths[rows] = [len(piece[index][self.columns[0]]) for index in rows]
        self._arrived += len(rows)

    def _close_arrival(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._file.close()
            self._stream = self._file = None

    def abort(self) -> None:
        self._close_arrival()
        shutil.rmtree(self.temporary, ignore_errors=True)

    def finish(self, meta: Mapping[str, Any]) -> str:
        """Write the entry in row order and move it into place; returns its path."""
        try:
            self._close_arrival()
            missing = np.flatnonzero(self._position < 0)
            if len(missing):
                raise RuntimeError(
                    f"The reference cache entry {self.key} received {self.num_rows - len(missing)} of its "
                    f"{self.num_rows} rows (the first missing: {missing[:5].tolist()}); it is not written."
                )
            data = os.path.join(self.temporary, DATA_DIR)
            if self._arrived == 0:  # an empty dataset
                Dataset(InMemoryTable(_rows_table({column: [] for column in self.columns}))).save_to_disk(data)
            else:
                arrived = Dataset.from_file(self._arrival_path)  # memory-mapped, not read into memory
                # Indices kept in memory (8 bytes a row), not as a cache file inside the entry
                arrived.select(self._position, keep_in_memory=True).save_to_disk(data)
                del arrived
                os.remove(self._arrival_path)
            _write_meta(self.temporary, meta)  # last: a folder without it is not an entry
            return _publish(self.root, self.key, self.temporary, self.columns, self._lengths)
        except BaseException:
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise


def write_entry(root: str, key: str, columns: Mapping[str, list[np.ndarray]], meta: Mapping[str, Any]) -> str:
    """Write an entry atomically: into a hidden temporary sibling, `meta.json` last, then `os.replace` into place.

    An exception or a kill before the replace leaves only the temporary folder (never read as an entry, removed on
    an exception, or by a later write once its writer is dead: `remove_stale_temporaries`); a reader sees either no
    entry or a complete one. A complete entry with the same key is never deleted (another job may be reading it,
    memory-mapped): this write's copy is dropped instead. Only a folder found incomplete is replaced. The rows are
    given at once here; `EntryWriter` takes them in pieces, as `precompute_reference_statistics` does.
    """
    num_rows = len(next(iter(columns.values()), []))
    writer = EntryWriter(root, key, list(columns), num_rows)
    try:
        writer.add({i: {column: rows[i] for column, rows in columns.items()} for i in range(num_rows)})
    except BaseException:
        writer.abort()
        raise
    return writer.finish(meta)


def _publish(root: str, key: str, temporary: str, columns: Sequence[str], lengths: np.ndarray) -> str:
    """Move the complete temporary folder into place as `root/key`, unless a complete entry is there already."""
    final = os.path.join(root, key)
    if (_read_meta(final) or {}).get("key") == key and read_entry(final, key, list(columns), lengths) is not None:
        shutil.rmtree(temporary, ignore_errors=True)  # another job wrote it meanwhile, complete: keep theirs
        return final
    if os.path.isdir(final):
        # Found incomplete or corrupt before this write: moved aside first (atomic), so `final` is never half gone
        aside = tempfile.mkdtemp(prefix=_temporary_prefix(key), dir=root)
        os.replace(final, os.path.join(aside, "old"))
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(temporary, final)
    except OSError:
        if (_read_meta(final) or {}).get("key") != key:
            raise
        shutil.rmtree(temporary, ignore_errors=True)  # another process wrote the same entry meanwhile
    return final


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


def reference_topk(
    distribution: stats_vocab.ReferenceDistribution,
    labels: torch.Tensor,
    names: Sequence[str],
    args: Mapping[str, Any],
    k: int,
    chunk_elements: int | None = None,
) -> dict[str, torch.Tensor]:
    """The top-k cache of a reference's distribution, from its final hidden states `(B, T, H)`.

    The supervised positions are projected through the reference's LM head a chunk at a time (float32 logits, as the
    training pass projects them: `trl_priority.statistics.lm_head.Head.logprobs`), and of each chunk's log π_ref `(n, V)` are kept

        ref_topk_ids    (B, T-1, k) int32    the k most likely next tokens, most likely first (`topk_of`)
        ref_topk_logps  (B, T-1, k) float32  their log-probabilities
        ref_<name>      (B, T-1)    float32  each statistic of `names` (`logps`: log π_ref(y_t)), exact

    all 0 at positions whose label is not supervised. k is capped at the vocabulary size.
    """
    hidden = distribution.hidden
    shifted = labels[:, 1:].to(hidden.device)  # (B, T-1)
    mask = shifted != -100  # (B, T-1)
    rows_hidden = hidden[:, :-1][mask]  # (N, H)
    rows_labels = shifted[mask]  # (N,)
    num_rows = rows_labels.numel()
    stats = stats_vocab.chunk_statistics(names, args)  # name -> fn(logprobs, labels)
    dtype = lm_head.compute_dtype(hidden)
    with torch.no_grad(), lm_head.gathered_head(distribution.causal_lm) as head:
        vocab = head.weight.shape[0]
        k = min(k, vocab)
        step = max(1, stats_vocab.chunk_elements_for(hidden.device, chunk_elements) // vocab)
        values = {f"ref_{name}": hidden.new_zeros(num_rows, dtype=torch.float32) for name in names}  # (N,)
        ids = torch.zeros(num_rows, k, dtype=torch.int32, device=hidden.device)  # (N, k)
        logps = torch.zeros(num_rows, k, dtype=torch.float32, device=hidden.device)  # (N, k)
        for start in range(0, num_rows, step):
            rows = slice(start, start + step)
            logprobs = head.logprobs(rows_hidden[rows], dtype)  # (n, V)
            top_ids, logps[rows], _ = topk_of(logprobs, rows_labels[rows], k)
            ids[rows] = top_ids.int()
            for name, fn in stats.items():
                values[f"ref_{name}"][rows] = fn(logprobs, rows_labels[rows])
    out = {}
    for name, value in {**values, "ref_topk_ids": ids, "ref_topk_logps": logps}.items():
        full = value.new_zeros((*mask.shape, *value.shape[1:]))  # (B, T-1) or (B, T-1, k)
        full[mask] = value
        out[name] = full
    return out


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
            entry.differences = _main_value(accelerator, _nearest_entry, root, components)
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
    "cache_key",
    "EntryWriter",
    "default_cache_dir",
    "precompute_reference_statistics",
    "read_entry",
    "write_entry",
]
