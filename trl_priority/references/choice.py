"""Which reference a run reads, decided in one place from its plan, and what identifies each source's values.

`reference_for(plan, given, policy, args, load)` turns `RunPlan.reference_kind` into one `Reference`
(`trl_priority.references.sources`), unloaded: a model source loads its model only when `load()` is called (by the trainer,
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

The disk cache (`trl_priority.references.precompute.CachedColumns`) and the epoch cache (`trl_priority.references.epoch_cache.EpochCache`)
wrap a source and keep its identity.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoTokenizer
from trl.trainer.utils import add_fused_lm_head, get_config_model_id

from trl_priority.loading import dequantize_head, load_like_policy
from trl_priority.references.sources import (
    AdapterReference,
    CallbackReference,
    ColumnReference,
    ModelReference,
    Reference,
    add_frozen_adapter_copy,
    check_same_vocabulary,
    freeze_and_place,
)
from trl_priority.statistics import causal_lm_of


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
    from trl_priority.references import identity as identities  # the identities the cache key hashes

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


def load_reference_model(
    plan, given: Given, policy: torch.nn.Module, args, tokenizer, accelerator, is_deepspeed: bool, is_fsdp: bool
) -> torch.nn.Module:
    """A model source's model (`plan.reference_kind` "model_path", "model" or "starting_model"), loaded from a path
    like the policy (`loading.load_like_policy`), checked to score the policy's vocabulary, given the fused heads, and
    placed frozen next to the policy (`reference.freeze_and_place`)."""
    ref_model, ref_tokenizer = given.ref_model, None
    if plan.reference_kind == "model_path":
        ref_model = plan.reference_path
        with contextlib.suppress(OSError, ValueError):  # a model folder without tokenizer files: size check only
            ref_tokenizer = AutoTokenizer.from_pretrained(ref_model, trust_remote_code=args.trust_remote_code)
        init_kwargs = args.ref_model_init_kwargs or args.model_init_kwargs
        ref_model = load_like_policy(ref_model, init_kwargs, given.quantization_config, policy, args)
    elif plan.reference_kind == "starting_model":
        ref_model = given.starting_model
        if ref_model is None:  # the policy was loaded from a path: load it again
            path = get_config_model_id(policy.config)
            ref_model = load_like_policy(path, args.model_init_kwargs, given.quantization_config, policy, args)
    dequantize_head(ref_model, "reference model")
    check_same_vocabulary(ref_model, causal_lm_of(policy), tokenizer, ref_tokenizer)
    add_fused_lm_head(ref_model, outputs=("log_probs", "entropy"))
    return freeze_and_place(ref_model, accelerator, is_deepspeed, is_fsdp)


def release_reference(reference: Reference | None, accelerator=None, policy=None) -> None:
    """Free a source's memory once its values are cached: its model, or the frozen copy of the starting adapter."""
    if reference is not None:
        reference.release(accelerator, policy)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["Given", "load_reference_model", "reference_for", "release_reference"]


def freeze_starting_reference(plan, model) -> torch.nn.Module | None:
    """Before `SFTTrainer` loads and patches the model: for a starting-adapter reference, add the frozen copy of the
    adapter; for a starting-model reference under full fine-tuning, return a frozen copy of the model (else None)."""
    if plan.reference_kind == "starting_adapter":
        # Training an adapter that was already trained: the reference is where it starts, not the bare base.
        add_frozen_adapter_copy(model)
    elif plan.reference_kind == "starting_model" and isinstance(model, torch.nn.Module):
        # Full fine-tuning: freeze a copy now, before the fused head is patched in and training starts.
        return copy.deepcopy(model)
    return None
