"""What a checkpoint of a priority run holds besides `Trainer`'s: `priority.json` (the method and the settings Φ was
computed with, compared on resume), the method's `TokenState` and the reference's epoch cache; and the picklable
`training_args.bin` of a run whose priority is a callable.

`PrioritySFTTrainer._save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler` call `save_priority_files` /
`load_priority_files` next to the optimizer state, before `trainer_state.json` marks the checkpoint complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
from collections.abc import Mapping
from typing import Any

from trl_priority.references import disk_cache as ref_cache


PRIORITY_RECORD = "priority.json"  # in every checkpoint: the method and settings it was trained with


@contextlib.contextmanager
def saveable_args(args):
    """`training_args.bin` is a pickle: a priority given as a lambda or a local function cannot be pickled, which
    would break every checkpoint. While saving, such a priority is written as its qualified name."""
    priority = args.priority
    if callable(priority):
        try:
            pickle.dumps(priority)
        except (pickle.PicklingError, AttributeError, TypeError):
            module = getattr(priority, "__module__", None) or "?"
            qualname = getattr(priority, "__qualname__", type(priority).__name__)
            args.priority = f"callable {module}.{qualname} (not picklable; pass it again to resume)"
    try:
        yield
    finally:
        args.priority = priority


def priority_record(priority, priority_args: Mapping[str, Any], args, reference_identity) -> dict[str, Any]:
    """Everything a resume must keep for Φ to mean what it meant (`priority.json`; a checkpoint of an older
    version holds fewer keys, and only those are compared)."""
    return {
        "priority": None if priority is None else priority.name,
        "priority_args": priority_args,
        "negative_loss": args.negative_loss,
        "priority_schedule": args.priority_schedule or {},
        "priority_warmup_ratio": args.priority_warmup_ratio,
        "priority_granularity": args.priority_granularity,
        "priority_pooling": args.priority_pooling,
        "reference": reference_identity,
    }


def save_priority_files(output_dir: str, record: Mapping[str, Any], state, cache) -> None:
    """Write `priority.json`, the method's state and the epoch cache (each when there is one) into `output_dir`
    (on the saving process)."""
    with open(os.path.join(output_dir, PRIORITY_RECORD), "w") as file:
        json.dump(record, file, indent=2, default=str)
    if state is not None:
        state.save(output_dir)
    if cache is not None:
        cache.save(output_dir, key=cache.key())


def load_priority_files(checkpoint: str, record: Mapping[str, Any], allow_change: bool, state, cache) -> None:
    """Compare the checkpoint's `priority.json` with this run's `record` (unless `allow_change`), then read the
    method's state and the epoch cache back (each when there is one)."""
    record_path = os.path.join(checkpoint, PRIORITY_RECORD)
    current = json.loads(json.dumps(record, default=str))
    if os.path.exists(record_path) and not allow_change:
        with open(record_path) as file:
            saved = json.load(file)
        # A checkpoint of an older version records fewer settings: those it has must match
        changed = {key: (saved[key], current[key]) for key in current if key in saved and saved[key] != current[key]}
        if changed:
            now, then = ({key: pair[i] for key, pair in changed.items()} for i in (1, 0))
            details = "; ".join(ref_cache._differences(now, then))  # "key.part checkpoint's → now"
            raise ValueError(
                f"The checkpoint {checkpoint} was trained with other priority settings ({details}). Resume with "
                "the same settings, or set `allow_priority_change=True` if the change is intended."
            )
    if state is not None:
        state.load(checkpoint)
    if cache is not None:
        cache.load(checkpoint, key=cache.key())


@contextlib.contextmanager
def only_trained_adapters(peft_model, frozen_adapter: str):
    """While saving, `peft_model.save_pretrained` writes every adapter but the frozen reference copy: the frozen
    "ref" adapter is set-up, not a result. A resumed run rebuilds the copy from the starting adapter it is given
    again."""
    trained = [name for name in peft_model.peft_config if name != frozen_adapter]
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, selected_adapters=trained)
    try:
        yield
    finally:
        del peft_model.save_pretrained  # back to the class method
