"""Where reference statistics come from.

A method that reads `ref_*` statistics gets them from one `Reference`:

| reference                          | when                                                                      |
|------------------------------------|---------------------------------------------------------------------------|
| `ModelReference`                   | a separate frozen model: `ref_model=` (instance or path), `ref_model_name_or_path`, or, for full fine-tuning, a frozen copy of the starting model |
| `AdapterReference(None)`           | LoRA training from a `peft_config`: the same network with the adapter switched off, no second copy |
| `AdapterReference("ref")`          | training an adapter that was already trained: a frozen copy of it, loaded next to it as adapter "ref" |
| `CallbackReference`                | `ref_model=` any other callable: `fn(batch) -> log-probs` or a dict of statistics |
| `ColumnReference`                  | `precomputed_ref_columns=True`: the statistics are dataset columns `ref_<name>`, no forward at all |

Model references run under `torch.no_grad()` in eval mode and never receive gradients. Each returns the requested
statistics keyed with their `ref_` prefix, shaped `(batch, seq_len - 1)` like the policy's, and, for methods whose loss
reads the reference's whole distribution, its final hidden states with the model that projects them (model
references only).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import disable_dropout_in_model, use_adapter

from trl_priority.statistics import (
    DistributionRequest,
    ReferenceDistribution,
    causal_lm_of,
    forward_statistics,
    vocab_size_of,
)


# Batch keys the reference forward never needs
_POLICY_ONLY_KEYS = ("output_router_logits",)


class Reference:
    """Base class of every source of reference statistics.

    - `statistics(policy, inputs, names, args, columns, distribution)` returns
      `({"ref_<name>": (B, T-1) tensor}, ReferenceDistribution | None)`;
    - `identity()` is what identifies its values (the reference cache's key, `priority.json`), computed once, without
      loading anything (the factory `trl_priority.references.choice.reference_for` gives each source its `identify`);
    - `load()` makes it ready to run (a model source loads and places its model then), `release(accelerator, policy)`
      frees what it holds once its values are cached elsewhere.
    """

    description = "reference"
    kind = "reference"
    _identify: Callable[[], dict[str, Any]] | None = None

    def identity(self) -> dict[str, Any] | None:
        """What identifies this source's values (computed on first use, then kept: hashing weights is collective)."""
        if "_identity" not in self.__dict__:
            self._identity = None if self._identify is None else self._identify()
        return self._identity

    def load(self) -> Reference:
        return self

    def release(self, accelerator=None, policy=None) -> None:
        """Free what the source holds (its values are cached elsewhere from now on)."""

    def statistics(
        self,
        policy: torch.nn.Module,
        inputs: Mapping[str, Any],
        names: Sequence[str],
        args: Mapping[str, Any],
        columns: Mapping[str, torch.Tensor] | None = None,
        distribution: bool = False,
    ) -> tuple[dict[str, torch.Tensor], ReferenceDistribution | None]:
        raise NotImplementedError


def _model_statistics(model, head_owner, inputs, names, args, distribution):
    """A model reference's statistics (and, when asked, its hidden states for distribution terms)."""
    inputs = {k: v for k, v in inputs.items() if k not in _POLICY_ONLY_KEYS}
    request = DistributionRequest(args=args, backbone_only=distribution)
    if distribution:
        # The backbone alone; the statistics come from the same projection as the distribution, in the policy's pass
        with torch.no_grad():
            forward_statistics(model, inputs, (), args, keep_outputs=False, request=request)
        return {}, ReferenceDistribution(request.hidden, causal_lm_of(head_owner), tuple(names))
    with torch.no_grad():
        _, stats = forward_statistics(model, inputs, names, args, keep_outputs=False, request=request)
    return {f"ref_{name}": value for name, value in stats.items()}, None


class ModelReference(Reference):
    """A separate frozen model, placed on the device (and sharded, under DeepSpeed ZeRO-3 or FSDP).

    Given as a model, or unloaded with `load=fn` (`fn()` returns the placed model): a source whose values a cache
    holds is then never loaded; `load()` (or the first `statistics`) loads it.
    """

    kind = "model"

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        description: str = "separate frozen model",
        *,
        load: Callable[[], torch.nn.Module] | None = None,
        identify: Callable[[], dict[str, Any]] | None = None,
        kind: str = "model",
    ):
        self.model = model
        self.description = description
        self._load = load
        self._identify = identify
        self.kind = kind

    def load(self) -> ModelReference:
        if self.model is None and self._load is not None:
            self.model = self._load()
        return self

    def release(self, accelerator=None, policy=None) -> None:
        """Drop the model from the accelerator's prepared models; it is not loaded again."""
        models = getattr(accelerator, "_models", None)
        if models is not None and self.model is not None:
            models[:] = [m for m in models if m is not self.model]
        self.model, self._load = None, None

    def statistics(self, policy, inputs, names, args, columns=None, distribution=False):
        self.load()
        return _model_statistics(self.model, self.model, inputs, names, args, distribution)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Run a block with `module` in eval mode (no dropout), then restore its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class AdapterReference(Reference):
    """The policy itself with its LoRA adapter switched off (`adapter_name=None`) or with a frozen adapter active."""

    def __init__(self, adapter_name: str | None, identify: Callable[[], dict[str, Any]] | None = None):
        self.adapter_name = adapter_name
        self.kind = "adapter_off" if adapter_name is None else "starting_adapter"
        self._identify = identify
        self.description = (
            "base model with the adapter switched off"
            if adapter_name is None
            else f"frozen copy of the starting adapter (adapter '{adapter_name}')"
        )

    def release(self, accelerator=None, policy=None) -> None:
        """Delete the frozen copy of the starting adapter from the policy (`add_frozen_adapter_copy`'s)."""
        name = self.adapter_name
        if name is not None and policy is not None and name in getattr(policy, "peft_config", {}):
            if len(policy.peft_config) > 1:
                policy.delete_adapter(name)

    def statistics(self, policy, inputs, names, args, columns=None, distribution=False):
        peft_model = getattr(policy, "module", policy)
        with torch.no_grad(), use_adapter(peft_model, self.adapter_name), eval_mode(policy):
            return _model_statistics(policy, policy, inputs, names, args, distribution)


class CallbackReference(Reference):
    """A user's function: `fn(batch)` returns reference log-probabilities, or a dict of reference statistics.

    `batch` is the model's input dict (`input_ids`, `labels`, `attention_mask` or padding-free `position_ids`, ...)
    on the training device. The return value is either a tensor of log-probabilities or a mapping with the statistics
    the method reads, keyed with or without their `ref_` prefix (`{"logps": ..., "mass": ...}`); every tensor has
    shape `(batch, seq_len - 1)`, where position t scores `labels[:, t + 1]` (TRL's fused-head layout), and finite
    values wherever the label is supervised. Use it for references that live elsewhere: a larger teacher on another
    device, a scoring server, precomputed values.
    """

    kind = "callback"

    def __init__(self, fn: Callable[[dict[str, Any]], Any], identify: Callable[[], dict[str, Any]] | None = None):
        self.fn = fn
        self._identify = identify
        self.description = f"callback {getattr(fn, '__name__', type(fn).__name__)}"

    def statistics(self, policy, inputs, names, args, columns=None, distribution=False):
        batch = {k: v for k, v in inputs.items() if k not in (*_POLICY_ONLY_KEYS, "use_cache")}
        mask = batch["labels"][:, 1:] != -100  # (B, T-1)
        with torch.no_grad():
            returned = self.fn(batch)
        if isinstance(returned, torch.Tensor):
            returned = {"logps": returned}
        if not isinstance(returned, Mapping):
            raise TypeError(
                f"The reference callback returned {type(returned).__name__}; return a tensor of reference "
                f"log-probabilities of shape {tuple(mask.shape)}, or a dict with the statistics {list(names)}."
            )
        returned = {(k[4:] if k.startswith("ref_") else k): v for k, v in returned.items()}
        missing = [name for name in names if name not in returned]
        if missing:
            raise ValueError(
                f"The reference callback returned {sorted(returned)}, but the method also needs {missing}. Return a "
                f"dict with the keys {list(names)} (with or without the 'ref_' prefix)."
            )
        out = {}
        for name in names:
            value = returned[name]
            if not isinstance(value, torch.Tensor) or value.shape != mask.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"The reference callback's '{name}' has shape {shape}; expected {tuple(mask.shape)} = (batch, "
                    "seq_len - 1), where position t scores labels[:, t + 1] like TRL's fused-head log_probs."
                )
            value = value.detach().to(device=mask.device, dtype=torch.float32)
            if not torch.isfinite(value[mask]).all():
                raise ValueError(
                    f"The reference callback's '{name}' has non-finite values at supervised positions "
                    f"({int((~torch.isfinite(value[mask])).sum())} of {int(mask.sum())})."
                )
            if name == "logps" and (value[mask] > 1e-4).any():
                raise ValueError(
                    f"The reference callback's 'logps' has positive values (max {value[mask].max().item():.4g}), but "
                    "log-probabilities are ≤ 0. Did it return the NLL (−log p) or logits? Return log p of each label: "
                    "`logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None])`, or `-nll`."
                )
            out[f"ref_{name}"] = torch.where(mask, value, 0.0)
        return out, None


class ColumnReference(Reference):
    """Reference statistics read from dataset columns `ref_<name>`, computed once beforehand: no forward at all.

    Each column holds one value per token of `input_ids`: the value at index i scores token i given the tokens before
    it (so index 0, which nothing predicts, is ignored), exactly like TRL's per-token `log_probs` shifted by one. The
    columns travel with the tokens through truncation, padding, padding-free and packing (`trl_priority.data.columns`).
    """

    description = "precomputed dataset columns"
    kind = "columns"

    def identity(self) -> dict[str, Any] | None:
        return {"kind": "columns"}

    @staticmethod
    def hint(name: str) -> str:
        return (
            f"`precomputed_ref_columns=True` reads the reference's '{name}' from a column 'ref_{name}' with one value "
            f"per token of `input_ids` (the value at i scores token i); compute it once with the reference model, "
            "or unset `precomputed_ref_columns` to run the reference online"
        )

    def statistics(self, policy, inputs, names, args, columns=None, distribution=False):
        mask = inputs["labels"][:, 1:] != -100  # (B, T-1)
        out = {}
        for name in names:
            value = columns[f"ref_{name}"][:, 1:].to(device=mask.device, dtype=torch.float32)  # (B, T-1)
            if not torch.isfinite(value[mask]).all():
                raise ValueError(f"The column 'ref_{name}' has non-finite values at supervised positions.")
            out[f"ref_{name}"] = torch.where(mask, value, 0.0)
        return out, None


def check_same_vocabulary(ref_model: torch.nn.Module, policy: torch.nn.Module, tokenizer=None, ref_tokenizer=None):
    """Raise if the reference scores another vocabulary than the policy: its log-probs would not be comparable."""
    ref_size = vocab_size_of(causal_lm_of(ref_model))
    policy_size = vocab_size_of(causal_lm_of(policy))
    if ref_size != policy_size:
        raise ValueError(
            f"The reference model's vocabulary has {ref_size} entries but the policy's has {policy_size}. A reference "
            "must use the policy's tokenizer, since it scores the same token ids. Use a reference from the same model "
            "family (same tokenizer), or compute its statistics yourself with a callback `ref_model=fn`."
        )
    if tokenizer is not None and ref_tokenizer is not None and ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            "The reference model's tokenizer maps tokens to other ids than the policy's. A reference must share the "
            "policy's tokenizer; use one from the same model family, or a callback `ref_model=fn`."
        )


def freeze_and_place(model: torch.nn.Module, accelerator, is_deepspeed: bool, is_fsdp: bool) -> torch.nn.Module:
    """Eval mode, no dropout, no gradients; then placed on the device, sharded as the policy is.

    - DDP or one process: `accelerator.prepare_model(evaluation_mode=True)`, a whole copy on each device, unwrapped.
    - DeepSpeed ZeRO-3: TRL's `prepare_deepspeed`, its own stage-3 inference engine, partitioned like the policy.
    - ZeRO-1 / ZeRO-2: TRL's `prepare_deepspeed` with stage 0, a whole copy on each device (those stages shard the
      optimizer state and gradients, which the reference does not have).
    - FSDP1: TRL's `prepare_fsdp`: the plugin's wrap policy, sharding strategy, mixed precision, `sync_module_states`.
    - FSDP2: accelerate's `fsdp2_prepare_model`, the function that shards the policy: one FSDP unit per transformer
      layer, the embeddings and the final norm + LM head in units of their own, the same mesh, mixed-precision and
      offload policies, and, with `cpu_ram_efficient_loading`, the shards filled from rank 0's weights. Every unit
      reshards after its forward, so between forwards each device holds only its shards.

    Under FSDP2, TRL's `prepare_fsdp` is not used: it calls `fully_shard` on the root alone, so the whole reference
    is one unit whose every weight is all-gathered at once in each forward (a whole copy per device at the peak,
    which is what sharding was meant to avoid). Under FSDP the layers to wrap are the policy's when the reference
    has them, and otherwise the reference's own `_no_split_modules` (a reference of another architecture that shares
    the tokenizer).
    """
    model.eval()
    model.requires_grad_(False)
    disable_dropout_in_model(model)
    if is_deepspeed:
        return prepare_deepspeed(model, accelerator)
    if is_fsdp:
        accelerator = _WithFSDPPlugin(accelerator, _fsdp_plugin_for(model, accelerator.state.fsdp_plugin))
        if accelerator.state.fsdp_plugin.fsdp_version == 2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            model = fsdp2_prepare_model(accelerator, model)
            # accelerate keeps the root and the LM-head unit gathered after the forward, until the backward reshards
            # them; the reference has no backward, so they would stay whole on every device from its first forward
            model.set_reshard_after_forward(True)
            model.eval()
            return model
        return prepare_fsdp(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


def _fsdp_plugin_for(model: torch.nn.Module, plugin):
    """A copy of the policy's FSDP plugin whose wrap policy names layer classes that `model` has.

    The plugin's transformer-layer classes were bound to the policy when it was prepared; a reference of another
    architecture has none of them, and would be one unit (FSDP1) or fail to wrap (FSDP2). Then the reference's own
    `_no_split_modules` are wrapped instead, as accelerate does for any model.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    own = copy.copy(plugin)
    names = plugin.transformer_cls_names_to_wrap
    if names and not all(get_module_class_from_name(model, name) is not None for name in names):
        own.transformer_cls_names_to_wrap = None  # `set_auto_wrap_policy` falls back to `model._no_split_modules`
    policy = own.auto_wrap_policy
    bound_by_accelerate = (transformer_auto_wrap_policy, size_based_auto_wrap_policy)
    if isinstance(policy, functools.partial) and policy.func in bound_by_accelerate:
        # Unbound again: `set_auto_wrap_policy(model)`, which both prepare functions call, binds it to `model`
        own.auto_wrap_policy = policy.func
    return own


class _WithFSDPPlugin:
    """`accelerator` as seen by TRL's `prepare_fsdp` and accelerate's `fsdp2_prepare_model`, which read the plugin
    from `accelerator.state.fsdp_plugin`: with the reference's own copy of it, so the policy's stays untouched."""

    def __init__(self, accelerator, plugin):
        self._accelerator = accelerator
        self.state = _StateWithPlugin(accelerator.state, plugin)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


class _StateWithPlugin:
    def __init__(self, state, plugin):
        self._state = state
        self.fsdp_plugin = plugin

    def __getattr__(self, name):
        return getattr(self._state, name)


def add_frozen_adapter_copy(peft_model, source: str = "default", name: str = "ref") -> None:
    """Load a frozen copy of adapter `source` next to it as adapter `name`, the starting point of training."""
    peft_model.add_adapter(name, peft_model.peft_config[source])
    for param_name, param in peft_model.named_parameters():
        if f".{source}." in param_name:
            copy = peft_model.get_parameter(param_name.replace(f".{source}.", f".{name}."))
            copy.data.copy_(param.data)
            copy.requires_grad_(False)
    peft_model.set_adapter(source)


def is_callback_reference(ref_model: Any) -> bool:
    return callable(ref_model) and not isinstance(ref_model, torch.nn.Module | str)


__all__ = [
    "AdapterReference",
    "CallbackReference",
    "ColumnReference",
    "ModelReference",
    "Reference",
    "add_frozen_adapter_copy",
    "check_same_vocabulary",
    "eval_mode",
    "freeze_and_place",
    "is_callback_reference",
]
