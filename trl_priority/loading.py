"""Loading models and checkpoints: the checks made before anything is loaded, a reference loaded like the policy,
and the last complete checkpoint of a run."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping

from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import create_model_from_path

from trl_priority.statistics import causal_lm_of, dequantize_lm_head


logger = get_logger(__name__)


def last_complete_checkpoint(output_dir: str, strict: bool = True, stacklevel: int = 3) -> str | None:
    """The newest `checkpoint-N` of `output_dir` that has its `trainer_state.json`; incomplete newer ones are skipped
    with a warning. With `strict`, no complete checkpoint is an error, as in `Trainer`."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            step = name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
            if step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(step), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        if os.path.exists(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        warnings.warn(f"Skipping the incomplete checkpoint {path} (no {TRAINER_STATE_NAME}).", stacklevel=stacklevel)
    if strict:
        raise ValueError(f"No complete checkpoint found in {output_dir} to resume from.")
    return None


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.path.exists(path)


def _same_path(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def check_model_path(path: str, which: str) -> None:
    """Fail before loading anything when a local model folder does not exist or holds no model."""
    expanded = os.path.expanduser(path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if _looks_local(path) or offline:
        if not os.path.exists(expanded) and not (offline and _in_hub_cache(path)):
            raise ValueError(
                f"The {which} path '{path}' does not exist"
                + (" (and the hub is offline, so it is not looked up there)" if offline else "")
                + ". Check the path, or give a hub id like 'org/name'."
            )
        if os.path.isdir(expanded) and not os.path.exists(os.path.join(expanded, "config.json")):
            raise ValueError(
                f"The {which} folder '{path}' has no config.json, so it holds no model saved with "
                "`save_pretrained` (an adapter-only folder needs its base model: load it with PEFT and pass the model)."
            )


def check_quantized_has_adapter(model, quantization_config, model_init_kwargs, peft_config) -> None:
    """Fail before loading when a bitsandbytes 4-bit or 8-bit model would train without an adapter.

    Quantized weights are frozen integers (4-bit NF4/FP4 codes, or int8) with no gradient: only an adapter on top of
    them trains (QLoRA, Dettmers et al. 2023, arXiv 2305.14314). transformers also refuses, but only once the model is
    loaded, and without naming the recipe settings.
    """
    if peft_config is not None:
        return
    if isinstance(model, str):
        config = quantization_config or (model_init_kwargs or {}).get("quantization_config")
        read = config.get if isinstance(config, Mapping) else functools.partial(getattr, config)  # a YAML dict too
        flags = read("load_in_4bit", False), read("load_in_8bit", False)
    elif is_peft_model(model):
        return
    else:
        flags = getattr(model, "is_loaded_in_4bit", False), getattr(model, "is_loaded_in_8bit", False)
    bits = 4 if flags[0] else 8 if flags[1] else None
    if bits is not None:
        raise ValueError(
            f"The model is loaded in {bits}-bit (`load_in_{bits}bit`), and {bits}-bit weights cannot be fully "
            "fine-tuned: they are frozen quantized codes, and only an adapter on top of them trains (QLoRA). Set "
            "`use_peft: true` in the recipe (with `lora_r`, `lora_alpha`, `lora_target_modules`) or pass "
            f"`peft_config=LoraConfig(...)`; or drop `load_in_{bits}bit` to fine-tune every weight."
        )


def load_like_policy(path: str, init_kwargs, quantization_config, policy, args) -> PreTrainedModel:
    """A model loaded from `path` as the policy was: its quantization (unless `init_kwargs` set their own), dtype and
    attention implementation, with `device_map=None` under distributed training."""
    kwargs = dict(init_kwargs or {})
    if quantization_config is not None:
        # A QLoRA policy's separate reference is quantized the same way (one 4-bit copy more, not a 16-bit one),
        # unless `ref_model_init_kwargs` sets its own `quantization_config` (None: unquantized)
        kwargs.setdefault("quantization_config", quantization_config)
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None  # distributed training requires device_map=None ("auto" fails)
    policy = causal_lm_of(policy)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    kwargs.setdefault("dtype", policy.dtype)
    # The reference attends as the policy does (sdpa, flash-attention, ...), so both see the same numerics
    attn_implementation = getattr(policy.config, "_attn_implementation", None)
    if attn_implementation is not None:
        kwargs.setdefault("attn_implementation", attn_implementation)
    return create_model_from_path(path, **kwargs)


def dequantize_head(causal_lm, which: str) -> None:
    """Dequantize a 4-bit LM head once (the fused per-token statistics project with its whole weight), and say so."""
    if dequantize_lm_head(causal_lm):
        head = causal_lm.get_output_embeddings()
        size = head.weight.numel() * head.weight.element_size() / 2**20
        logger.warning(
            f"The {which}'s LM head was loaded in 4-bit; it is dequantized once ({size:.0f} MiB in "
            f"{head.weight.dtype}), since the fused per-token log-probabilities project with its whole weight. The "
            "logits are the ones the 4-bit head computes. To save this memory, keep the head unquantized "
            "(transformers' default: leave `llm_int8_skip_modules` unset).",
            main_process_only=True,
        )


__all__ = [
    "check_model_path",
    "check_quantized_has_adapter",
    "dequantize_head",
    "last_complete_checkpoint",
    "load_like_policy",
]


def check_complete_checkpoint(checkpoint) -> None:
    """A run killed while saving leaves a `checkpoint-N` folder without `trainer_state.json` (written last): resuming
    from it names the last complete one instead of failing later."""
    if isinstance(checkpoint, str) and os.path.isdir(checkpoint):
        if not os.path.exists(os.path.join(checkpoint, TRAINER_STATE_NAME)):
            last = last_complete_checkpoint(os.path.dirname(os.path.abspath(checkpoint)), strict=False, stacklevel=4)
            raise ValueError(
                f"The checkpoint {checkpoint} is incomplete (no {TRAINER_STATE_NAME}: the run stopped "
                f"while saving it). Resume from the last complete one{f', {last}' if last else ''}, or pass "
                "`resume_from_checkpoint=True` to pick it."
            )


def check_before_load(model, args, train_dataset, evals, formatting_func, quantization_config, peft_config) -> None:
    """What the trainer checks before anything is loaded: the datasets (non-empty, their rows and columns named),
    an output directory holding a finished model, the model path, and a quantized model without an adapter."""
    from trl_priority import checks

    if isinstance(train_dataset, Dataset | list) and len(train_dataset) == 0:
        raise ValueError("The training dataset is empty: pass a dataset with at least one example.")
    checks.check_datasets({"train": train_dataset, **evals}, args, formatting_func)  # named before any load
    if message := checks.finished_model_warning(args.output_dir):
        warnings.warn(message, stacklevel=3)
    if isinstance(model, str):
        check_model_path(model, "model")
    check_quantized_has_adapter(model, quantization_config, args.model_init_kwargs, peft_config)
