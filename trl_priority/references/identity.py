"""The identities that a reference cache key hashes: a prepared dataset's content, a tokenizer's vocabulary, a
model path's files or hub commit, an in-memory model's weights, a callback's name (`trl_priority.references.disk_cache`
composes them into the key; `trl_priority.references.choice` identifies each reference source with them, and
`trl_priority.references.epoch_cache` keys its entries by `dataset_digest`)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from trl_priority import statistics as stats_vocab


# Files of a model folder that change when its weights or its loading change
_MODEL_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")
# Columns of a prepared row that the reference's values depend on (the rest is text or other statistics)
_CONTENT_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths", "attention_mask")


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


def jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
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
    return {"kind": "callback", "name": name, "cache_identity": jsonable(getattr(fn, "cache_identity", None))}


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
        "init_kwargs": jsonable(init_kwargs),
        "quantization": jsonable(quantization_config),
        "loaded_as": reference_loading(policy, loading_kwargs),
    }


def weights_identity(
    kind: str, module: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False
) -> dict[str, Any]:
    """A reference in memory: a fingerprint of its weights (`module_fingerprint`, collective when partitioned) and
    the dtype and attention it runs with."""
    return {"kind": kind, "parameters": module_fingerprint(module, skip=skip), "loaded_as": reference_loading(module)}
