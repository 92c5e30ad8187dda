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

This module is the on-disk format (which runs cache, the key, entries read, written, published and cleaned up) and
holds the cache's description above, hence its ~450 lines; the identities the key hashes are
`trl_priority.references.identity`, computing the entries is `trl_priority.references.precompute`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from accelerate.logging import get_logger
from datasets import Dataset, load_from_disk
from datasets.table import InMemoryTable

from trl_priority import statistics as stats_vocab
from trl_priority.references.identity import dataset_digest, jsonable, tokenizer_identity


logger = get_logger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
DATA_DIR = "data"
CACHE_ENV = "TRL_PRIORITY_CACHE"  # overrides the default cache folder of `ref_cache_dir="auto"`
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
    return jsonable(components), lengths


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


def nearest_entry(root: str, components: Mapping[str, Any]) -> list[str] | None:
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


__all__ = [
    "CACHE_ENV",
    "FORMAT_VERSION",
    "TOPK_COLUMNS",
    "EntryWriter",
    "cache_components",
    "cache_dir_for",
    "cache_key",
    "cached_statistics",
    "cached_topk",
    "default_cache_dir",
    "nearest_entry",
    "read_entry",
    "remove_stale_temporaries",
    "resolve_cache_dir",
    "write_entry",
]
