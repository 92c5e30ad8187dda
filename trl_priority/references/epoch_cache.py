"""The lazy epoch cache (`ref_epoch_cache`): the reference's values kept per token after their first epoch.

Without `ref_cache_dir` (`trl_priority.references.disk_cache`), the values the reference computes during training are kept per
token, keyed by the per-token identity (`example_index`, `token_position`) in a `TokenState`; a later micro-batch
whose supervised tokens are all known skips the reference forward. It is kept in memory or in a SQLite file under
`output_dir`, saved in checkpoints and restored on resume, and used only for references that stay frozen during
training.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger

from trl_priority import statistics as stats_vocab
from trl_priority.references.disk_cache import (
    _differences,
    cached_statistics,
    scheduled_statistic_hyperparameters,
)
from trl_priority.references.identity import dataset_digest
from trl_priority.references.sources import (
    AdapterReference,
    CallbackReference,
    ColumnReference,
    ModelReference,
    Reference,
)
from trl_priority.statistics.state import TokenState, load_state, save_state


logger = get_logger(__name__)

EPOCH_CACHE_NAME = "ref_epoch_cache"  # in checkpoints: .safetensors (memory) or .sqlite (disk), and .json (its key)


def epoch_cache_wanted(args, priority, priority_args: Mapping[str, Any], cache_dir: str | None) -> bool:
    """Whether the run keeps the reference's values per token for its later epochs (decided before data preparation,
    which then adds the per-token identity columns): an online, cacheable reference, and possibly more than one
    epoch (`max_steps` set, or `num_train_epochs` > 1)."""
    wanted = (
        args.ref_epoch_cache != "none"
        and cache_dir is None
        and not args.precomputed_ref_columns
        and bool(cached_statistics(priority, priority_args))
        and not priority.needs_reference_distribution  # the distribution is projected in the policy's forward
        and not (args.dataset_kwargs or {}).get("skip_prepare_dataset", False)
        and (args.max_steps > 0 or args.num_train_epochs > 1)
    )
    scheduled = scheduled_statistic_hyperparameters(args, priority, priority_args) if wanted else []
    if scheduled:
        raise ValueError(
            f"`priority_schedule` moves {scheduled}, which the reference statistics are computed with, so the values of "
            "epoch 1 cannot be kept for the later epochs (`ref_epoch_cache`). Leave them fixed, or set "
            "`ref_epoch_cache='none'`."
        )
    return wanted


def epoch_cache_key(
    reference: Mapping[str, Any] | None, statistics: Mapping[str, Any], rows: Mapping[str, Any] | None, mixed_precision
) -> dict[str, Any]:
    """What the kept values depend on, saved next to them (`ref_epoch_cache.json`) and compared on resume: the
    reference (its source's `identity()`), the statistics with their hyperparameters, the training rows (their content
    hash, since the values are keyed by example index) and the mixed precision."""
    key = {"reference": reference, "statistics": statistics, "rows": rows, "mixed_precision": str(mixed_precision)}
    return json.loads(json.dumps(key, default=str))


class _SqliteRows:
    """One statistic's rows in the SQLite file, read like `TokenState`'s in-memory `{example: row}`."""

    def __init__(self, db: sqlite3.Connection, name: str):
        self.db, self.name = db, name

    def get(self, example: int, default=None):
        found = self.db.execute("SELECT row FROM rows WHERE name = ? AND example = ?", (self.name, example)).fetchone()
        return default if found is None else torch.from_numpy(np.frombuffer(found[0], dtype=np.float32).copy())


class _SqliteTables:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def get(self, name: str, default=None) -> _SqliteRows:
        return _SqliteRows(self.db, name)


class DiskTokenState(TokenState):
    """A `TokenState` whose rows live in a SQLite file instead of memory (`ref_epoch_cache="disk"`).

    The file is scratch space: a run starts it empty, a checkpoint holds a consistent copy of it, a resume copies it
    back. Every write is also shared with the other processes (`TokenState.sync`), each of which keeps its own file.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.remove(path)  # another run's values, keyed by another dataset's example indices
        self._connect()

    def _connect(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        # Scratch space: the checkpoint's copy is the durable one, so no journal to sync on every write
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("PRAGMA journal_mode = MEMORY")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rows (name TEXT, example INTEGER, row BLOB, PRIMARY KEY (name, example))"
        )
        self._tables = _SqliteTables(self._db)

    def _apply(self, name, examples, positions, values) -> None:
        table = _SqliteRows(self._db, name)
        for example, row in self._updated_rows(table, examples, positions, values):
            self._db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)", (name, example, row.numpy().tobytes()))
        self._db.commit()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _state_of(self._db)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._db.execute("DELETE FROM rows")
        for key, row in state.items():
            name, example = key.rsplit("/", 1)
            blob = row.float().contiguous().numpy().tobytes()
            self._db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)", (name, int(example), blob))
        self._db.commit()

    def backup_to(self, path: str) -> None:
        target = sqlite3.connect(path)
        with contextlib.closing(target):
            self._db.backup(target)

    def restore_from(self, path: str) -> None:
        self._db.close()
        shutil.copyfile(path, self.path)
        self._connect()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]


def _state_of(db: sqlite3.Connection) -> dict[str, torch.Tensor]:
    """Every row of an epoch-cache database, keyed `name/example` as `TokenState.state_dict` keys them."""
    return {
        f"{name}/{example}": torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy())
        for name, example, blob in db.execute("SELECT name, example, row FROM rows")
    }


def _read_sqlite_state(path: str) -> dict[str, torch.Tensor]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return _state_of(db)


def reference_is_frozen(reference: Reference, policy: torch.nn.Module) -> bool:
    """Whether the reference gives the same values all through training (so they can be kept across epochs).

    A separate model is frozen (`freeze_and_place`); a callback is taken to be (document: set `ref_epoch_cache="none"`
    for one that changes); the adapter-off base or a starting adapter copy is frozen unless training updates base
    weights (a trainable parameter outside every adapter). Any other kind says so with a `frozen` attribute.
    """
    if isinstance(reference, ModelReference | CallbackReference):
        return True
    if isinstance(reference, AdapterReference):
        adapters = tuple(f".{name}." for name in getattr(policy, "peft_config", {}))
        return not any(p.requires_grad and not any(a in n for a in adapters) for n, p in policy.named_parameters())
    return bool(getattr(reference, "frozen", False))


class EpochCache(Reference):
    """The reference with a per-token memory: a training micro-batch whose supervised tokens were all scored before
    reads their values instead of running the reference (for the later epochs of a multi-epoch run).

    Values are stored, at each supervised token's identity (`example_index`, `token_position` of the token it
    scores), while the run has more than one epoch to go over them again. Under several processes the decision to
    skip is taken by all of them together (a sharded reference's forward is collective), and every write is shared.
    A value read back was computed in another batch: equal to the online value up to float rounding of padding.
    """

    kind = "epoch_cache"

    def __init__(
        self,
        reference: Reference,
        state: TokenState,
        accelerator,
        should_store: Callable[[], bool],
        mode: str,
        statistics: Mapping[str, Any] | None = None,
        rows: Any = None,
    ):
        self.reference = reference
        self.state = state
        self.accelerator = accelerator
        self.should_store = should_store
        self.mode = mode
        self.description = f"{reference.description}, values kept per token after their first epoch ({mode})"
        self.forwards = 0  # reference forwards run through this cache
        self._statistics = dict(statistics or {})  # the cached statistics with their hyperparameters (the key's)
        self._rows = rows  # the training rows the values are keyed by (hashed for the key, once)

    def identity(self) -> dict[str, Any] | None:
        return self.reference.identity()

    def key(self) -> dict[str, Any]:
        """`epoch_cache_key` of this cache: its source's identity, its statistics, the training rows' hash."""
        if "_rows_digest" not in self.__dict__:
            rows = self._rows
            self._rows_digest = dataset_digest(rows)[0] if hasattr(rows, "select_columns") else None
        return epoch_cache_key(self.identity(), self._statistics, self._rows_digest, self.accelerator.mixed_precision)

    @classmethod
    def for_plan(
        cls,
        plan,
        reference: Reference | None,
        policy: torch.nn.Module,
        accelerator,
        output_dir: str,
        should_store: Callable[[], bool],
        priority_args: Mapping[str, Any],
        rows: Any = None,
    ) -> EpochCache | None:
        """The run's epoch cache around `reference` (`plan.cache == "epoch"`), or None: no epoch cache planned, or a
        reference that moves during training."""
        if plan.cache != "epoch" or reference is None or isinstance(reference, ColumnReference):
            return None
        if not reference_is_frozen(reference, policy):
            logger.info("trl-priority: the reference changes during training; its values are not kept per token.")
            return None
        mode = plan.epoch_cache
        if mode == "disk":
            path = os.path.join(output_dir, EPOCH_CACHE_NAME, f"rank-{accelerator.process_index}.sqlite")
            state = DiskTokenState(path)
        else:
            state = TokenState()
        names = plan.cached_statistics
        statistics = {n: {hp: priority_args[hp] for hp in stats_vocab.hyperparameters_of(n)} for n in names}
        cache = cls(reference, state, accelerator, should_store, mode, statistics, rows)
        logger.info(
            f"trl-priority: reference values kept per token for later epochs ({mode}).", main_process_only=True
        )
        return cache

    def statistics(self, policy, inputs, names, args, columns=None, distribution=False):
        mask = inputs["labels"][:, 1:] != -100  # (B, T-1)
        identity = (columns["example_index"][:, 1:].to(mask.device), columns["token_position"][:, 1:].to(mask.device))
        self.state.bind(*identity, writable=True)
        known = {f"ref_{name}": self.state.get(f"ref_{name}") for name in names}  # (B, T-1), NaN where unknown
        hit = all(not value[mask].isnan().any() for value in known.values())
        if self.accelerator.num_processes > 1:  # skip only if every process can
            hit = bool(self.accelerator.gather(torch.tensor([hit], device=mask.device)).all())
        if hit:
            return {key: torch.where(mask, value, 0.0) for key, value in known.items()}, None
        self.forwards += 1
        statistics, distribution_ = self.reference.statistics(policy, inputs, names, args, columns, distribution)
        if self.should_store():
            for key, value in statistics.items():
                self.state.set(key, value, where=mask & known[key].isnan())
            self.state.sync(self.accelerator)
        return statistics, distribution_

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save(self, directory: str, key: Mapping[str, Any] | None = None) -> None:
        """The kept values, and `key` (`epoch_cache_key`: what they were computed with; `self.key()` by the trainer)
        beside them."""
        if key is not None:
            with open(os.path.join(directory, f"{EPOCH_CACHE_NAME}.json"), "w") as file:
                json.dump(key, file, indent=2, sort_keys=True)
        if isinstance(self.state, DiskTokenState):
            self.state.backup_to(os.path.join(directory, f"{EPOCH_CACHE_NAME}.sqlite"))
            return
        save_state(self.state, os.path.join(directory, f"{EPOCH_CACHE_NAME}.safetensors"))

    def load(self, directory: str, key: Mapping[str, Any] | None = None) -> None:
        """Restore the kept values of a checkpoint, if they were computed with `key`; otherwise start empty (the
        values of another reference, statistic or dataset must not be served)."""
        tensors = os.path.join(directory, f"{EPOCH_CACHE_NAME}.safetensors")
        database = os.path.join(directory, f"{EPOCH_CACHE_NAME}.sqlite")
        if not (os.path.exists(database) or os.path.exists(tensors)):
            logger.info(f"trl-priority: {directory} holds no reference epoch cache; it starts empty.")
            return
        if key is not None:
            saved = _read_key(os.path.join(directory, f"{EPOCH_CACHE_NAME}.json"))
            if saved != key:
                why = (
                    "it has no key (an older checkpoint)" if saved is None else "; ".join(_differences(key, saved)[:4])
                )
                logger.warning(
                    f"trl-priority: the reference epoch cache of {directory} was computed with other inputs ({why}); "
                    "it starts empty and the reference runs again for the tokens of this run."
                )
                return
        if os.path.exists(database) and isinstance(self.state, DiskTokenState):
            self.state.restore_from(database)
        elif os.path.exists(database):
            self.state.load_state_dict(_read_sqlite_state(database))
        else:
            load_state(self.state, tensors)


def _read_key(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


__all__ = ["DiskTokenState", "EpochCache", "epoch_cache_key", "epoch_cache_wanted", "reference_is_frozen"]
