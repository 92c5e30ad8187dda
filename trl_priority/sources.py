"""Which reference a run reads, decided in one place from its plan, and what identifies each source's values.

`reference_for(plan, given, policy, args, load)` turns `RunPlan.reference_kind` into one `Reference`
(`trl_priority.reference`), unloaded: a model source loads its model only when `load()` is called (by the trainer,
for a run that reads the reference online, or by the reference cache on a miss), so a cache hit never loads it. Each
source carries its `identity()`, computed from the same decision without loading anything:

| kind               | source                                    | identity                                               |
|--------------------|-------------------------------------------|--------------------------------------------------------|
| `columns`          | `ColumnReference`                         | `{"kind": "columns"}`                                  |
| `callback`         | `CallbackReference(fn)`                   | the function's qualified name and its `cache_identity` |
| `model_path`       | `ModelReference`, loaded from the path    | the path's files or hub commit, the loading kwargs, quantization, dtype/attention |
| `model`            | `ModelReference(ref_model)`               | a fingerprint of the model's weights, its dtype/attention |
| `adapter_off`      | `AdapterReference(None)`                  | the policy's path as for `model_path`, else its weights less the adapter |
| `starting_adapter` | `AdapterReference("ref")`                 | the policy's weights less the adapter being trained     |
| `starting_model`   | `ModelReference`, the copy (or reloaded)  | the policy's path, else the copy's weights              |

The disk cache (`trl_priority.ref_cache.CachedColumns`) and the epoch cache (`trl_priority.epoch_cache.EpochCache`)
wrap a source and keep its identity.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch

from .reference import AdapterReference, CallbackReference, ColumnReference, ModelReference, Reference


@dataclasses.dataclass
class Given:
    """What the trainer was given to build its reference from (`PrioritySFTTrainer.__init__`'s arguments)."""

    ref_model: Any = None  # a path, a module, a callable or None
    model: Any = None  # the policy as given: a path or a module
    starting_model: torch.nn.Module | None = None  # the frozen copy for full fine-tuning from a module
    quantization_config: Any = None


def reference_for(
    plan, given: Given, policy: torch.nn.Module, args, load: Callable[[Given], torch.nn.Module]
) -> Reference | None:
    """The run's source of reference statistics (`plan.reference_kind`), not loaded yet.

    Args:
        plan: the run's `RunPlan`.
        given: the trainer's arguments the reference is built from.
        policy: the policy as prepared by the trainer (a PEFT model under an adapter).
        args: the training arguments (loading kwargs of the reference and the policy).
        load: `load(given)` returns the reference model loaded and placed (the trainer's `_build_reference`): called
            by a model source's `load()`.
    """
    from . import ref_cache as identities  # the identity functions live with the cache key

    kind = plan.reference_kind
    if kind == "none":
        return None
    if kind == "columns":
        return ColumnReference()
    if kind == "callback":
        return CallbackReference(given.ref_model, identify=lambda: identities.callback_identity(given.ref_model))
    if kind == "model_path":
        path = plan.reference_path
        identify = lambda: identities.path_reference_identity(  # noqa: E731
            "model",
            path,
            args.ref_model_init_kwargs or args.model_init_kwargs or {},
            given.quantization_config,
            policy,
            loading_kwargs=args.ref_model_init_kwargs or args.model_init_kwargs or {},
        )
        description = f"separate frozen model {path}"
    elif kind == "model":
        identify = lambda: identities.weights_identity("model", given.ref_model)  # noqa: E731
        description = f"separate frozen model ({type(given.ref_model).__name__})"
    elif kind in ("adapter_off", "starting_adapter"):
        if plan.reference_path is not None and kind == "adapter_off":
            identify = lambda: identities.path_reference_identity(  # noqa: E731
                kind, plan.reference_path, args.model_init_kwargs or {}, given.quantization_config, policy
            )
        else:  # the policy's own weights before training, less the adapter being trained
            identify = lambda: identities.weights_identity(  # noqa: E731
                kind, policy, skip=lambda name: ".default." in name
            )
        return AdapterReference("ref" if kind == "starting_adapter" else None, identify=identify)
    elif kind == "starting_model":
        if plan.reference_path is not None:
            identify = lambda: identities.path_reference_identity(  # noqa: E731
                kind, plan.reference_path, args.model_init_kwargs or {}, given.quantization_config, policy
            )
        else:
            identify = lambda: identities.weights_identity(kind, given.starting_model)  # noqa: E731
        description = "frozen copy of the starting model"
    else:
        raise ValueError(f"Unknown reference kind '{kind}'.")
    return ModelReference(None, description, load=lambda: load(given), identify=identify, kind=kind)


def release_reference(reference: Reference | None, accelerator=None, policy=None) -> None:
    """Free a source's memory once its values are cached: its model, or the frozen copy of the starting adapter."""
    if reference is not None:
        reference.release(accelerator, policy)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["Given", "reference_for", "release_reference"]
