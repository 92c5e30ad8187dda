"""Overhead of each priority method against TRL's own SFTTrainer, measured in the same run.

Every method trains the same model on the same batches as `trl.SFTTrainer` (`loss_type="nll"`), and the script
reports, per method, the ratio of its time per optimizer step and of its peak memory to TRL's: the median over
`--repeats` and the spread (min-max). Ratios, never absolute timings, are what to compare across machines.

    python scripts/benchmark_overhead.py --repeats 3                      # the default run (see docs)
    python scripts/benchmark_overhead.py --methods sft,dft,eaft --modes lora --references online --repeats 3
    python scripts/benchmark_overhead.py --methods sft,dft --modes s2ft --references online --repeats 3   # S2FT vs LoRA
    python scripts/benchmark_overhead.py --measure deterministic --methods sft,eaft,asft   # FLOPs and peak bytes only

Writes `overhead.md` (the table), `overhead.csv` (every measurement) and `overhead.png` (the chart) to `--output-dir`
(default `docs/benchmarks/`; the stem is `--output-name`, `overhead_deterministic` with `--measure deterministic`).
`--methods` filters the methods. `docs/benchmarks_overhead.md` describes the method in full; in short:

- Time: from one optimizer step's end to the next, so it counts what runs before a step begins (fetching the
  micro-batches, a step-wide selection's scoring pass): wall time on a GPU (CUDA synchronised); on the CPU the
  process's CPU time, which other jobs on a shared machine inflate far less than wall time (`--clock`; the CSV has
  both). Every example has the same length, so every step does the same work: the first step is not timed, and a
  run's value is its fastest timed step.
- Memory: the peak a run adds from before its trainer (and the policy's copy of the weights) is made: the CUDA
  allocator peak on a GPU; on the CPU, the resident-set peak sampled every 2 ms (coarse).
- Pairing: TRL runs bracket every `--baseline-every` methods, in an order shuffled per repeat, and each method is
  divided by the mean of the TRL runs just before and after it, so that a shared machine's drift cancels.
- Deterministic measures (`--measure both`, the default, or `--measure deterministic` alone: no timing, one run per
  case, a few seconds each): on a shared CPU the time cannot resolve a 5% target, so every case (and TRL once per
  mode) also gets one counted run, `CountStep` over its second optimizer step: from the first step's end (after
  `optimizer.step()` and `zero_grad`) to just before the second `optimizer.step()`, i.e. fetching the micro-batches,
  a step-wide selection's scoring pass, every forward (policy, reference, LM head, distribution pass) and backward
  (with gradient checkpointing's recomputation) and gradient clipping; not the optimizer update. Two numbers, as
  ratios to TRL in the same mode:
  - FLOPs: `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add of a matrix product: mm, addmm,
    bmm, baddbmm, SDPA, convolution), plus `extra_flop_formulas()`: the in-place `addmm_` with which TRL's fused LM
    head accumulates its backward GEMMs, and SDPA's CPU kernel, which torch's registry leaves out. Element-wise work
    (softmax, log-softmax, entropy, norms) counts zero. A matrix-product-looking op with no formula is reported
    (`uncounted_products` in the CSV; none on the models here).
  - Peak bytes: `PeakTensorBytes`, a `TorchDispatchMode` that adds each new tensor storage's `nbytes()` when an op
    returns it and subtracts it from a `weakref.finalize` when the storage is freed; the peak of the live total from
    0 at the window's start. It counts tensor storages allocated during the step (activations, saved tensors, LM-head
    tiles, gradients and `.grad`, a reference forward's outputs, the collated batch), not the Python heap nor a
    kernel's internal scratch buffers, and excludes everything present before the step: the model's parameters, a
    frozen reference copy's weights, the optimizer state (so, unlike the resident-set memory ratio, it does not
    charge an explicit reference's copy). Exact and the same on every run and machine for the same code.
  The table also gives the absolute GFLOP, the part of them in products with a vocabulary-sized operand ("LM-head
  GFLOP": products that read an LM head's weight or write its gradient, the policy's and any reference's) and the peak MiB, TRL's in brackets.
  Targets: the project issue's for the methods it names, `asft` and `target_sft` ≤ 1.2x, `eaft` and `prift_mass`
  ≤ 1.05x (FLOPs and peak bytes, LoRA and full, any reference: `ISSUE_TARGETS`); any other method its time target
  (FLOPs) and memory target (peak bytes).
- Reference axis (`--references online,cached`): "online" runs the method's reference forward each step; "cached"
  sets `ref_cache_dir` (`trl_priority.references.disk_cache`): the reference statistics are computed once, before timing, into a
  fresh cache, and every timed run reads them back as columns with no reference forward. Methods that read the
  reference's whole next-token distribution (`asft`, `target_sft`) cache its top `ref_cache_topk` tokens (64), an
  approximation of the exact distribution their online row uses.
- Targets (judged on the median): a method that reads no reference ≤ 1.05x time and memory; a cached reference
  ≤ 1.05x; an online reference ≤ 1.4x time; a method that computes a full next-token distribution ≤ 1.2x memory.
- Trainable parameters: every run counts `p.numel()` over the parameters with `requires_grad` once its trainer is
  built (after S2FT's selection), the method's and the TRL runs' (a mode's TRL runs all count the same).

Modes: `lora` (TRL and the method both with LoRA), `full` (both full fine-tuning, for `--full-methods`), and `s2ft`:
the method runs with `structural_priority: s2ft` (`trl_priority.beyond_tokens.structural`, its arguments from `--s2ft-args`, the
recipe's defaults otherwise) and no LoRA, against TRL's SFTTrainer with the `lora` mode's LoRA: what S2FT costs in
time, memory and trainable parameters against the adapter it replaces. No target applies to that mode (it compares
two ways to fine-tune, not a priority's overhead).

Models (random weights): on the CPU, a small Llama-shaped model with SmolLM2's vocabulary (49,152), where the LM head
is most of the compute, so a priority's costs show; on a GPU, a Qwen2-0.5B-shaped model (151,936 vocabulary, tied
embeddings) in bfloat16. Gradient checkpointing is on, as in TRL's `SFTConfig` default.

Data are random token ids with a prompt and a completion. Methods that read data get synthetic columns (see
`make_dataset`): per-token scores (`critical`'s contrastive score, `tshirt`'s information gain) uniform in [0, 1),
example-level columns (noise, unlearn marks) 0 and 1 in turn, and every span column two spans per completion (its
first and third quarter of the text, valued 1 and -1: a verifier's "verified" and "wrong"). A method name may carry a
granularity, `dft@word` or `dft@span` (`priority_granularity`). Reference methods use their default reference: the
base with the adapter off (LoRA) or a frozen copy of the starting model (full fine-tuning); methods that require an
explicit reference (`rho1`, `forgetting`, `selectkd`, `swift`, `token_cleaning`) are given a frozen copy of the
starting weights, which the memory ratio includes.
"""

from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import functools
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer

from trl_priority import PrioritySFTConfig, PrioritySFTTrainer, available_priorities, get_priority
from trl_priority.statistics import DATA_STATISTICS, DISTRIBUTION_STATISTICS


# Targets, judged on the median ratio to TRL's SFTTrainer
POLICY_ONLY = 1.05  # time and memory of a method that reads no reference
CACHED_REFERENCE = 1.05  # time and memory with the reference's statistics read from columns
ONLINE_REFERENCE = 1.4  # time with a reference forward every step
FULL_DISTRIBUTION_MEMORY = 1.2  # memory of a method that computes a whole next-token distribution
TARGET_LINES = (POLICY_ONLY, FULL_DISTRIBUTION_MEMORY, ONLINE_REFERENCE)
# The project issue's targets for the deterministic measures (FLOPs and peak tensor bytes of a step, against TRL in the
# same mode), whatever the reference: the whole-distribution methods ≤ 1.2x, EAFT and PriFT-mass ≤ 1.05x. Any other
# method is held to its time target (FLOPs) and memory target (peak bytes).
ISSUE_TARGETS = {"asft": 1.2, "target_sft": 1.2, "eaft": 1.05, "prift_mass": 1.05}

# Shapes by device, overridable from the command line
PRESETS = {
    # ~28M parameters, 80% of them in the embedding and the LM head: the head is most of a step's compute
    "cpu": dict(
        model="llama",
        vocab=49152,
        hidden=256,
        layers=4,
        intermediate=768,
        heads=4,
        kv_heads=2,
        batch_size=2,
        seq_len=128,
        steps=3,
        tied=False,
    ),
    # Qwen2-0.5B's shape (494M parameters), random weights, bfloat16
    "gpu": dict(
        model="qwen2",
        vocab=151936,
        hidden=896,
        layers=24,
        intermediate=4864,
        heads=14,
        kv_heads=2,
        batch_size=4,
        seq_len=1024,
        steps=10,
        tied=True,
    ),
}
# Full fine-tuning, by default, for a few methods that stand for the rest: the baseline, the policy's full
# distribution, an online (and cached) reference, a distribution term, an explicit reference with a step-wide selection
DEFAULT_FULL_METHODS = "sft,eaft,prift_prob,asft,rho1"


# ------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data
# ------------------------------------------------------------------------------------------------------------------
def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(vocab_size - 2)} | {"<pad>": vocab_size - 2, "<eos>": vocab_size - 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="<pad>", eos_token="<eos>"
    )


def make_model(shape: dict, dtype: torch.dtype) -> torch.nn.Module:
    kwargs = dict(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(2 * shape["seq_len"], 2048),
        tie_word_embeddings=shape["tied"],
        pad_token_id=shape["vocab"] - 2,
        eos_token_id=shape["vocab"] - 1,
    )
    torch.manual_seed(0)
    if shape["model"] == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs, rope_theta=1e6)).to(dtype)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype)


def make_dataset(n: int, prompt_len: int, completion_len: int, tokenizer) -> Dataset:
    """`n` tokenized examples of a prompt of `prompt_len` tokens and a completion of `completion_len`, with a
    synthetic value for every data column a registered method may read. Every example has the same length, so that
    every step does the same work and a run's fastest step is its cost."""
    vocab_size = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    lengths = [completion_len] * n
    ids = [torch.randint(0, vocab_size - 2, (prompt_len + c,), generator=generator).tolist() for c in lengths]
    columns = {"input_ids": ids, "completion_mask": [[0] * prompt_len + [1] * c for c in lengths]}
    # Character length of each completion as the trainer decodes it, to place the spans
    text_lengths = [len(tokenizer.decode(row[prompt_len:])) for row in ids]
    for spec in DATA_STATISTICS.values():
        if spec.generated or spec.column in columns:
            continue
        if spec.level == "example":  # noise scores, unlearn marks: 0 and 1 in turn
            columns[spec.column] = [float(i % 2) for i in range(n)]
        elif spec.level == "token":  # per-token scores (contrastive, information gain): uniform in [0, 1)
            columns[spec.column] = [torch.rand(len(row), generator=generator).tolist() for row in ids]
        else:  # spans: the first and third quarter of each completion's text, valued 1 and -1
            columns[spec.column] = [
                [[0.0, float(length // 4), 1.0], [float(length // 2), float(3 * length // 4), -1.0]]
                for length in text_lengths
            ]
    return Dataset.from_dict(columns)


# ------------------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------------------
class StepTimer(TrainerCallback):
    """Time from one optimizer step's end to the next: everything a step costs, including what runs before
    `on_step_begin` (fetching the micro-batches and a step-wide selection's scoring pass).

    Two clocks: wall time (CUDA synchronised), and `cpu_clock`, the process's CPU time less the memory sampler's (on
    the CPU: the work a step costs, which other jobs on a shared machine do not inflate as they inflate wall time).
    """

    def __init__(self, cpu_clock):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.cpu_clock = cpu_clock
        self.last: tuple[float, float] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = (time.perf_counter(), self.cpu_clock())
        if self.last is not None:
            self.wall.append(now[0] - self.last[0])
            self.cpu.append(now[1] - self.last[1])
        self.last = now


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Return freed memory before the next run, so that its growth is measured from a clean start."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:  # glibc keeps freed heap pages; give them back so that the next run's RSS growth is its own
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


class PeakMemory:
    """Peak memory a block adds: CUDA allocator peak, or sampled resident-set growth on the CPU."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def cpu_seconds(self) -> float:
        """The process's CPU time (user + system, every thread) less the sampler thread's own."""
        sampler = 0.0
        if getattr(self, "thread", None) is not None and self.thread.is_alive():
            sampler = time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))
        return time.process_time() - sampler

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.value = self.peak - self.base


# ------------------------------------------------------------------------------------------------------------------
# Deterministic measures: FLOPs and peak tensor bytes of one optimizer step
# ------------------------------------------------------------------------------------------------------------------
def _mm_flops(a_shape, b_shape) -> int:
    """2 m k n: the multiply-adds of an [m, k] @ [k, n] product (torch's own convention)."""
    m, k = a_shape[-2:]
    n = b_shape[-1]
    return 2 * m * k * n


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _mm_flops(a_shape, b_shape)


def _baddbmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return a_shape[0] * _mm_flops(a_shape, b_shape)


def _mv_flops(a_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _addmv_flops(self_shape, a_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _dot_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def extra_flop_formulas() -> dict:
    """Matrix products torch's `FlopCounterMode` registry leaves out, which a CPU training step runs:

    - `addmm_` (in place): TRL's fused LM head (`trl.kernels.chunked_logprob`) accumulates the head's backward GEMMs
      with `acc.addmm_(a, b)` in float32 on the CPU; without this entry the head's backward would count zero FLOPs.
      Likewise `baddbmm_`, and `mv`/`addmv`/`dot`.
    - `_scaled_dot_product_flash_attention_for_cpu` (and its backward): SDPA's CPU kernel; torch registers the CUDA
      kernels (flash, efficient, cuDNN) only. Counted with torch's own SDPA formulas (dense, as for CUDA).
    """
    aten = torch.ops.aten
    formulas = {
        aten.addmm_: _addmm_inplace_flops,
        aten.baddbmm_: _baddbmm_inplace_flops,
        aten.mv: _mv_flops,
        aten.addmv: _addmv_flops,
        aten.dot: _dot_flops,
        aten.vdot: _dot_flops,
    }
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops),
    ):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = formula
    return formulas


# Op names that look like a matrix product or attention; one of them outside the registry is reported as uncounted
_PRODUCT_HINTS = ("mm", "matmul", "dot", "attention", "conv", "linear", "einsum", "mv")


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with `extra_flop_formulas()`: FLOPs of matrix products only (2 per multiply-add:
    mm, addmm, bmm, baddbmm, SDPA, convolution and the in-place/CPU variants above); element-wise work (softmax,
    log-softmax, entropy, norms, the optimizer) counts zero."""
    return FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


class UncountedProducts(TorchDispatchMode):
    """The ops run while active whose names look like a matrix product but that `counter` has no formula for
    (`names`), and, given the LM head's weight size (`vocab * hidden` elements), the FLOPs of the counted products
    with an operand stored in a tensor of that size (`vocab_flops`): the products that read an LM head's weight, or
    a slice of it (TRL's fused head projects it in vocabulary chunks), or write its gradient; the policy's and any
    reference's. (A weight cast to another dtype first, under autocast, is a new tensor and escapes this.)"""

    def __init__(self, counter, head_numel: int | None = None):
        super().__init__()
        self.registry = counter.flop_registry
        self.head_numel = head_numel
        self.names: set[str] = set()
        self.vocab_flops = 0

    def _reads_head(self, leaf) -> bool:
        if not isinstance(leaf, torch.Tensor) or leaf.layout != torch.strided:
            return False
        try:
            return leaf.untyped_storage().nbytes() == self.head_numel * leaf.element_size()
        except (RuntimeError, NotImplementedError):
            return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet not in self.registry:
            if any(hint in packet.__name__ for hint in _PRODUCT_HINTS):
                self.names.add(str(packet))
        elif self.head_numel is not None and any(self._reads_head(leaf) for leaf in tree_leaves((args, kwargs))):
            self.vocab_flops += self.registry[packet](*args, **kwargs, out_val=out)
        return out


class PeakTensorBytes(TorchDispatchMode):
    """Exact peak of the tensor-storage bytes allocated while the mode is active, deterministic on any device.

    Every ATen op (forward, autograd backward, checkpoint recomputation, factory functions) passes through
    `__torch_dispatch__`. An output tensor whose storage is none of the op's inputs' storages and not already tracked
    is a new allocation: its `untyped_storage().nbytes()` is added to the live total, and a `weakref.finalize` on the
    storage (torch keeps one Python object per storage, so it fires when the storage itself is freed, after its last
    view) subtracts it. A tracked storage that an op resizes (`out=`, `resize_`) is re-counted at its new size.
    `peak` is the largest live total, from 0 when the mode is entered.

    Counted: storages allocated while active, by ops seen by the dispatcher (activations, saved tensors, logits and
    LM-head tiles, gradients and `.grad`, a reference forward's outputs, the batch's tensors when made inside).
    Not counted: every tensor that exists when the mode is entered (the model's parameters, a reference copy's weights,
    the optimizer state, buffers; their in-place updates allocate nothing), the Python heap, and a kernel's internal
    scratch memory that no op returns (e.g. a GEMM's packing buffers)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage key -> counted bytes
        self.current = 0
        self.peak = 0
        self.allocated = 0  # every counted allocation, freed or not

    @staticmethod
    def _storage(tensor):
        try:
            if tensor.layout != torch.strided or tensor.device.type == "meta":
                return None
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (e.g. a wrapper subclass)
            return None

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def track(self, tensor, input_keys=frozenset()) -> None:
        """Count `tensor`'s storage if it is new (public so that a test can drive it without ops)."""
        storage = self._storage(tensor)
        if storage is None:
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        if key in self.live:
            grown = nbytes - self.live[key]
            if grown:  # resized in place
                self.live[key] = nbytes
                self.current += grown
                self.allocated += max(grown, 0)
        elif key in input_keys:
            return  # a view or an in-place result of an input
        else:  # new, even if empty: a later `out=` or `resize_` may grow it
            self.live[key] = nbytes
            self.current += nbytes
            self.allocated += nbytes
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        input_keys = set()
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and (storage := self._storage(leaf)) is not None:
                input_keys.add(storage._cdata)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf, input_keys)
        return out


@dataclass
class StepCount:
    flops: int
    peak_bytes: int
    allocated_bytes: int
    uncounted: tuple[str, ...]
    lm_head_flops: int | None = None  # the products on an LM head's weight (`UncountedProducts`)


class CountStep(TrainerCallback):
    """FLOPs and peak tensor bytes of the second optimizer step (the first that the timer times): from the first
    step's end (after `optimizer.step()` and `zero_grad`) to just before the second `optimizer.step()`. The window
    holds everything the step runs before its optimizer: fetching and collating the micro-batches, a step-wide
    selection's scoring pass, every micro-batch's forward (policy, reference, LM head, distribution pass) and
    backward (with gradient checkpointing's recomputation), and gradient clipping; not the optimizer update."""

    def __init__(self):
        self.modes: list | None = None
        self.result: StepCount | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and self.result is None and self.modes is None:
            config = getattr(kwargs.get("model"), "config", None)
            head = None
            if config is not None:
                text = config.get_text_config()
                head = text.vocab_size * text.hidden_size
            counter = flop_counter()
            self.modes = [counter, UncountedProducts(counter, head), PeakTensorBytes()]
            for mode in self.modes:
                mode.__enter__()

    def close(self):
        if self.modes is None:
            return
        for mode in reversed(self.modes):
            mode.__exit__(None, None, None)
        counter, uncounted, peak = self.modes
        self.modes = None
        self.result = StepCount(
            counter.get_total_flops(),
            peak.peak,
            peak.allocated,
            tuple(sorted(uncounted.names)),
            uncounted.vocab_flops if uncounted.head_numel is not None else None,
        )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.modes is not None:
            self.close()
            control.should_training_stop = True  # nothing later is counted
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


@dataclass(frozen=True)
class Case:
    """One row of the table: a method (None: TRL's SFTTrainer) in a mode, with its reference online or cached."""

    mode: str  # "lora", "full" or "s2ft" (the method with S2FT, TRL with LoRA)
    method: str | None  # "name" or "name@granularity"
    reference: str = "-"  # "online", "cached", or "-" for a method that reads no reference

    @property
    def name(self) -> str:
        return "trl" if self.method is None else self.method.split("@")[0]

    @property
    def granularity(self) -> str:
        return self.method.split("@")[1] if self.method and "@" in self.method else "token"


@dataclass
class Result:
    case: Case
    category: str  # "policy-only", "online reference", "cached reference"
    time_target: float | None
    memory_target: float | None
    note: str = ""  # why a case is not measured
    times: list[float] = field(default_factory=list)  # the method's median step time, per repeat (s)
    base_times: list[float] = field(default_factory=list)  # TRL's, bracketing it (s)
    wall_times: list[float] = field(default_factory=list)  # the method's median wall time, per repeat (s)
    memories: list[float] = field(default_factory=list)  # bytes
    base_memories: list[float] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)  # the method's trainable parameters, per repeat
    base_trainable: list[int] = field(default_factory=list)  # TRL's (the run before its block)
    # Deterministic measures of one optimizer step (`CountStep`), one value each: they do not vary between runs
    flop_target: float | None = None
    peak_target: float | None = None
    flops: int | None = None
    base_flops: int | None = None  # TRL's, same mode
    peak_bytes: int | None = None
    base_peak_bytes: int | None = None
    uncounted: str = ""  # matrix-product ops FlopCounterMode had no formula for, ";"-separated (none expected)
    lm_head_flops: int | None = None  # of `flops`, the products on an LM head's weight (policy's, reference's)
    base_lm_head_flops: int | None = None

    @property
    def time_ratios(self) -> list[float]:
        return [t / b for t, b in zip(self.times, self.base_times)]

    @property
    def memory_ratios(self) -> list[float]:
        return [m / b if b > 0 else math.nan for m, b in zip(self.memories, self.base_memories)]

    @property
    def flop_ratios(self) -> list[float]:
        """The FLOP ratio to TRL, as a list of one (none when not counted), like the timed ratios."""
        if self.flops is None or self.base_flops is None:
            return []
        return [self.flops / self.base_flops if self.base_flops > 0 else math.nan]

    @property
    def peak_ratios(self) -> list[float]:
        if self.peak_bytes is None or self.base_peak_bytes is None:
            return []
        return [self.peak_bytes / self.base_peak_bytes if self.base_peak_bytes > 0 else math.nan]


def deterministic_targets(case: Case, time_target: float | None, memory_target: float | None):
    """`(FLOP target, peak-bytes target)`: the issue's target for the methods it names, else the time and memory ones."""
    if case.mode == "s2ft":
        return None, None
    if case.name in ISSUE_TARGETS:
        return ISSUE_TARGETS[case.name], ISSUE_TARGETS[case.name]
    return time_target, memory_target


def classify(case: Case) -> tuple[str, float | None, float | None, str]:
    """`(category, time target, memory target, note)` of a case; a note means it cannot be measured."""
    priority = get_priority(case.name)
    args = priority.resolve_args(None)
    uses_reference = priority.reference_used(args)
    policy_distribution = any(name in DISTRIBUTION_STATISTICS for name in priority.statistics_from("policy", args))
    reference_distribution = any(name in DISTRIBUTION_STATISTICS for name in priority.reference_statistics_for(args))
    if not uses_reference:
        if case.mode == "s2ft":  # S2FT against LoRA: two ways to fine-tune, no overhead target
            return "policy-only", None, None, ""
        memory = FULL_DISTRIBUTION_MEMORY if policy_distribution else POLICY_ONLY
        return "policy-only", POLICY_ONLY, memory, ""
    if case.mode == "s2ft":
        return ("cached" if case.reference == "cached" else "online") + " reference", None, None, ""
    if case.reference == "cached":
        # A whole-distribution method's cache holds the reference's top-k (`ref_cache_topk`): the policy's
        # distribution is still projected, with gradient, for its term
        full = policy_distribution or priority.needs_reference_distribution
        return "cached reference", CACHED_REFERENCE, FULL_DISTRIBUTION_MEMORY if full else CACHED_REFERENCE, ""
    full = policy_distribution or reference_distribution or priority.needs_reference_distribution
    return "online reference", ONLINE_REFERENCE, FULL_DISTRIBUTION_MEMORY if full else None, ""


MODES = ("lora", "full", "s2ft")


def lora_config() -> LoraConfig:
    """The LoRA of the `lora` mode, and of TRL's runs in the `s2ft` mode."""
    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")


def uses_lora(case: Case) -> bool:
    return case.mode == "lora" or (case.mode == "s2ft" and case.method is None)


def baseline_label(mode: str) -> str:
    return "TRL SFTTrainer (lora, s2ft mode)" if mode == "s2ft" else f"TRL SFTTrainer ({mode})"


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_trainer(case: Case, model, dataset, tokenizer, cli, output_dir, callbacks=(), ref_model=None):
    """TRL's SFTTrainer (`case.method` None) or PrioritySFTTrainer for the case, training `cli.steps` steps."""
    common = dict(
        output_dir=output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=cli.batch_size,
        gradient_accumulation_steps=cli.gradient_accumulation_steps,
        learning_rate=1e-4,
        bf16=cli.bf16,
        gradient_checkpointing=True,  # TRL's default
        report_to="none",
        save_strategy="no",
        logging_steps=cli.steps,
        disable_tqdm=True,
        max_length=None,
        seed=0,
        dataloader_num_workers=0,
    )
    peft_config = lora_config() if uses_lora(case) else None
    kwargs = {} if ref_model is None else {"ref_model": ref_model}
    if case.method is None:
        args, trainer_cls = SFTConfig(**common, loss_type="nll"), SFTTrainer
    else:
        cached = case.reference == "cached"
        args = PrioritySFTConfig(
            **common,
            priority=case.name,
            priority_granularity=case.granularity,
            ref_cache_dir=cli.ref_cache_dir if cached else None,
            **(
                dict(structural_priority="s2ft", structural_priority_args=cli.s2ft_args or None)
                if case.mode == "s2ft"
                else {}
            ),
        )
        trainer_cls = PrioritySFTTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def needs_explicit_reference(case: Case) -> bool:
    return case.method is not None and get_priority(case.name).reference == "explicit"


def fill_cache(case: Case, base, dataset, tokenizer, cli, output_dir) -> None:
    """Build the cached case's trainer once, untimed: `ref_cache_dir` computes the reference statistics over the
    prepared rows and stores them; the timed runs find them under the same key and run no reference."""
    ref_model = copy.deepcopy(base) if needs_explicit_reference(case) else None
    make_trainer(case, copy.deepcopy(base), dataset, tokenizer, cli, output_dir, ref_model=ref_model)
    release_memory()


def run_once(case: Case, base, dataset, tokenizer, cli, output_dir) -> tuple[float, float, float, int]:
    """Train `cli.steps` steps from a copy of `base`; return the fastest step after the first (on `cli.clock`), the
    fastest on the wall clock, the peak memory and the trainable parameters (counted once the trainer is built)."""
    # An explicit reference read from the cache is needed only for the cache key, while the trainer is built (the
    # trainer frees it): made before the memory count starts, and dropped before training
    cached_reference = None
    if needs_explicit_reference(case) and case.reference == "cached":
        cached_reference = copy.deepcopy(base)
    release_memory()
    # Memory from before the policy's copy and the trainer are made: the policy's weights, a frozen reference copy,
    # the optimizer state and the activations all count
    with PeakMemory() as memory:
        timer = StepTimer(memory.cpu_seconds)
        model = copy.deepcopy(base)
        ref_model = cached_reference
        if needs_explicit_reference(case) and case.reference != "cached":
            ref_model = copy.deepcopy(base)
        trainer = make_trainer(case, model, dataset, tokenizer, cli, output_dir, [timer], ref_model)
        if cached_reference is not None:
            ref_model = cached_reference = None
        trainable = trainable_parameters(trainer.model)
        trainer.train()
    del trainer, model, ref_model
    release_memory()
    # Every step does the same work, and interference only ever adds time: the fastest step is the run's cost
    wall = min(timer.wall)
    return (wall if cli.clock == "wall" else min(timer.cpu)), wall, memory.value, trainable


def count_once(case: Case, base, dataset, tokenizer, cli, output_dir) -> tuple[StepCount, int]:
    """Train from a copy of `base` until the second optimizer step's `optimizer.step()`, counting that step's FLOPs
    and peak tensor bytes (`CountStep`); return the count and the trainable parameters."""
    cached_reference = copy.deepcopy(base) if needs_explicit_reference(case) and case.reference == "cached" else None
    model = copy.deepcopy(base)
    ref_model = cached_reference
    if needs_explicit_reference(case) and case.reference != "cached":
        ref_model = copy.deepcopy(base)
    counter = CountStep()
    trainer = make_trainer(case, model, dataset, tokenizer, cli, output_dir, [counter], ref_model)
    ref_model = cached_reference = None
    trainable = trainable_parameters(trainer.model)
    trainer.train()
    del trainer, model
    release_memory()
    if counter.result is None:
        raise RuntimeError(f"{case}: the second optimizer step was never reached")
    return counter.result, trainable


def measure_deterministic(results: list[Result], mode: str, base, dataset, tokenizer, cli, output_dir) -> None:
    """Fill in the deterministic measures of `results` (all of one mode): one counted run of TRL, one of each case."""
    baseline, base_trainable = count_once(Case(mode, None), base, dataset, tokenizer, cli, output_dir)
    print(
        f"  {baseline_label(mode)}: {baseline.flops / 1e9:.3f} GFLOP ({(baseline.lm_head_flops or 0) / 1e9:.3f} in LM "
        f"heads), peak {baseline.peak_bytes / 2**20:.2f} MiB"
        + (f"; uncounted products: {', '.join(baseline.uncounted)}" if baseline.uncounted else ""),
        flush=True,
    )
    for result in results:
        if result.note:
            continue
        count, trainable = count_once(result.case, base, dataset, tokenizer, cli, output_dir)
        result.flops, result.base_flops = count.flops, baseline.flops
        result.peak_bytes, result.base_peak_bytes = count.peak_bytes, baseline.peak_bytes
        result.lm_head_flops, result.base_lm_head_flops = count.lm_head_flops, baseline.lm_head_flops
        result.uncounted = ";".join(sorted(set(count.uncounted) | set(baseline.uncounted)))
        if not result.trainable:  # the timed runs count them too
            result.trainable, result.base_trainable = [trainable], [base_trainable]
        print(
            f"  {row_label(result)}: flops x{result.flop_ratios[0]:.3f} ({count.flops / 1e9:.3f} GFLOP, "
            f"{(count.lm_head_flops or 0) / 1e9:.3f} in LM heads), peak bytes "
            f"x{result.peak_ratios[0]:.3f} ({count.peak_bytes / 2**20:.2f} MiB)"
            + (f"; uncounted products: {result.uncounted}" if result.uncounted else ""),
            flush=True,
        )


def measure(results: list[Result], mode: str, base, dataset, tokenizer, cli, output_dir) -> None:
    """Fill in `results` (all of one mode): per repeat, TRL runs bracket every `cli.baseline_every` cases, in an
    order shuffled per repeat; each case is divided by the mean of the TRL runs on either side of its block."""
    measured = [result for result in results if not result.note]
    baseline = Case(mode, None)
    for repeat in range(cli.repeats):
        order = measured[:]
        random.Random(repeat).shuffle(order)
        before = run_once(baseline, base, dataset, tokenizer, cli, output_dir)
        for start in range(0, len(order), cli.baseline_every):
            block = order[start : start + cli.baseline_every]
            values = []
            for result in block:
                values.append(run_once(result.case, base, dataset, tokenizer, cli, output_dir))
            after = run_once(baseline, base, dataset, tokenizer, cli, output_dir)
            for result, (step_time, wall, peak, trainable) in zip(block, values):
                result.times.append(step_time)
                result.wall_times.append(wall)
                result.memories.append(peak)
                result.trainable.append(trainable)
                result.base_times.append((before[0] + after[0]) / 2)
                result.base_memories.append((before[2] + after[2]) / 2)
                result.base_trainable.append(before[3])
                print(f"  [{repeat + 1}/{cli.repeats}] {row_label(result)}: {fmt_row(result)}", flush=True)
            before = after


# ------------------------------------------------------------------------------------------------------------------
# Profile: where a method's extra time goes
# ------------------------------------------------------------------------------------------------------------------
# The regions the trainer marks with `torch.profiler.record_function` (trl_priority/trainer.py). Their times are
# inclusive: `step_selection` contains the scoring pass's own `reference` and `policy_forward`.
PROFILE_REGIONS = (
    "trl_priority.step_selection",
    "trl_priority.reference",
    "trl_priority.policy_forward",
    "trl_priority.priority",
)


class ProfileSteps(TrainerCallback):
    """torch.profiler over every optimizer step after the first (the same steps the timer times)."""

    def __init__(self):
        self.profiler = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        else:
            self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)


def profile_case(case: Case, base, dataset, tokenizer, cli, output_dir) -> dict:
    """One profiled run of a case: its step time (wall) and, per step, the time in each marked region and the ops
    that take the most time themselves."""
    ref_model = copy.deepcopy(base) if needs_explicit_reference(case) else None
    timer, profile = StepTimer(time.process_time), ProfileSteps()
    trainer = make_trainer(case, copy.deepcopy(base), dataset, tokenizer, cli, output_dir, [timer, profile], ref_model)
    trainer.train()
    del trainer, ref_model
    release_memory()
    events = profile.profiler.key_averages()
    device = torch.cuda.is_available()
    per_step = max(profile.steps, 1)
    regions = {}
    for event in events:
        if event.key in PROFILE_REGIONS:
            total = event.device_time_total if device else event.cpu_time_total
            regions[event.key] = total / 1e6 / per_step
    self_time = (lambda e: e.self_device_time_total) if device else (lambda e: e.self_cpu_time_total)
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=self_time, reverse=True)[:5]
    return {
        "step": statistics.mean(timer.wall),
        "regions": regions,
        "ops": [(e.key, self_time(e) / 1e6 / per_step) for e in ops],
    }


def profile_cases(results: list[Result], base, dataset, tokenizer, cli, output_dir) -> str:
    """Profile TRL and every case once per mode (after a warm-up run); return the markdown report."""
    lines = [
        "| case | step (s) | × TRL | "
        + " | ".join(r.split(".")[1] for r in PROFILE_REGIONS)
        + " | top ops (self time per step) |",
        "|---|---|---|" + "---|" * len(PROFILE_REGIONS) + "---|",
    ]
    for mode in dict.fromkeys(r.case.mode for r in results):
        cases = [Case(mode, None)] + [r.case for r in results if r.case.mode == mode and not r.note]
        run_once(Case(mode, None), base, dataset, tokenizer, cli, output_dir)  # warm-up
        baseline = None
        for case in cases:
            found = profile_case(case, base, dataset, tokenizer, cli, output_dir)
            baseline = baseline or found["step"]
            label = baseline_label(mode) if case.method is None else row_label(Result(case, "", None, None))
            cells = [f"{found['regions'][r]:.3f}" if r in found["regions"] else "" for r in PROFILE_REGIONS]
            ops = ", ".join(f"{name} {seconds:.3f}" for name, seconds in found["ops"])
            lines.append(
                f"| {label} | {found['step']:.3f} | {found['step'] / baseline:.2f} | "
                + " | ".join(cells)
                + f" | {ops} |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------------
def row_label(result: Result) -> str:
    case = result.case
    reference = "" if case.reference == "-" else f", {case.reference} ref"
    mode = "s2ft vs TRL LoRA" if case.mode == "s2ft" else case.mode
    return f"{case.method} ({mode}{reference})"


def spread(values: list[float]) -> tuple[float, float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    return statistics.median(finite), min(finite), max(finite)


def fmt_ratio(values: list[float]) -> str:
    median, low, high = spread(values)
    return f"{median:.2f} ({low:.2f}-{high:.2f})" if math.isfinite(median) else "-"


def verdict(values: list[float], target: float | None) -> str:
    median = spread(values)[0]
    if target is None or not math.isfinite(median):
        return "-"
    return f"{'met' if median <= target else 'missed'} (≤ {target:g})"


def fmt_count(values: list[int]) -> str:
    """A count that every repeat measured the same (else its min-max)."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def fmt_row(result: Result) -> str:
    counts = (
        f", trainable {fmt_count(result.trainable)} (TRL {fmt_count(result.base_trainable)})"
        if result.trainable
        else ""
    )
    return f"time x{fmt_ratio(result.time_ratios)}, memory x{fmt_ratio(result.memory_ratios)}{counts}"


def fmt_exact(values: list[float]) -> str:
    """A deterministic ratio (one value), to 3 decimals: an exact 1.000 is TRL's own work."""
    return f"{values[0]:.3f}" if values and math.isfinite(values[0]) else "-"


def markdown_table(results: list[Result]) -> str:
    """The time and memory columns when the results were timed, the FLOP and peak-bytes columns when they were
    counted, the trainable-parameter columns when the results have them (a CSV written before any of these existed
    has none)."""
    timed = any(r.times for r in results) or not any(r.flops is not None for r in results)
    counted = any(r.flops is not None for r in results)
    trainable = any(r.trainable for r in results)
    header = ["mode", "method", "reference"]
    if timed:
        header += ["time ratio, median (min-max)", "time target", "memory ratio, median (min-max)", "memory target"]
    if counted:
        header += [
            "flop ratio",
            "flop target",
            "peak bytes ratio",
            "peak bytes target",
            "GFLOP (TRL)",
            "LM-head GFLOP (TRL)",
            "peak MiB (TRL)",
        ]
    if trainable:
        header += ["trainable parameters", "TRL's trainable parameters"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        case = r.case
        cells = [case.mode, f"`{case.method}`", case.reference]
        if r.note:
            lines.append("| " + " | ".join(cells + [r.note] + [""] * (len(header) - 4)) + " |")
            continue
        if timed:
            cells += [
                fmt_ratio(r.time_ratios),
                verdict(r.time_ratios, r.time_target),
                fmt_ratio(r.memory_ratios),
                verdict(r.memory_ratios, r.memory_target),
            ]
        if counted:
            absolute = ("-", "-", "-")  # GFLOP, LM-head GFLOP, peak MiB, each with TRL's in brackets
            if r.flops is not None:
                head = "-"
                if r.lm_head_flops is not None and r.base_lm_head_flops is not None:
                    head = f"{r.lm_head_flops / 1e9:.4g} ({r.base_lm_head_flops / 1e9:.4g})"
                absolute = (
                    f"{r.flops / 1e9:.4g} ({r.base_flops / 1e9:.4g})",
                    head,
                    f"{r.peak_bytes / 2**20:.4g} ({r.base_peak_bytes / 2**20:.4g})",
                )
            cells += [
                fmt_exact(r.flop_ratios),
                verdict(r.flop_ratios, r.flop_target),
                fmt_exact(r.peak_ratios),
                verdict(r.peak_ratios, r.peak_target),
                *absolute,
            ]
        if trainable:
            cells += [fmt_count(r.trainable), fmt_count(r.base_trainable)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_COLUMNS = [
    "mode", "method", "reference", "category", "repeat", "time_ratio", "memory_ratio", "step_time_s", "trl_step_time_s",
    "wall_step_time_s", "peak_memory_mib", "trl_peak_memory_mib", "time_target", "memory_target",
    # the deterministic measures, the same on every repeat's row (one row with empty timings when not timed)
    "flop_ratio", "peak_bytes_ratio", "flops", "trl_flops", "peak_bytes", "trl_peak_bytes", "flop_target",
    "peak_bytes_target", "uncounted_products", "lm_head_flops", "trl_lm_head_flops",
    "note", "trainable_parameters", "trl_trainable_parameters",
]  # fmt: skip


def write_csv(results: list[Result], path: Path) -> None:
    blank = lambda value: "" if value is None else value  # noqa: E731
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            case = r.case
            head = [case.mode, case.method, case.reference, r.category]
            targets = [blank(r.time_target), blank(r.memory_target)]
            if r.note:
                writer.writerow([*head, "", "", "", "", "", "", "", "", *targets, *[""] * 6,
                                 blank(r.flop_target), blank(r.peak_target), "", "", "", r.note, "", ""])  # fmt: skip
                continue
            counted = [
                f"{r.flop_ratios[0]:.6f}" if r.flop_ratios else "",
                f"{r.peak_ratios[0]:.6f}" if r.peak_ratios else "",
                blank(r.flops), blank(r.base_flops), blank(r.peak_bytes), blank(r.base_peak_bytes),
                blank(r.flop_target), blank(r.peak_target), r.uncounted, blank(r.lm_head_flops),
                blank(r.base_lm_head_flops),
            ]  # fmt: skip
            rows = list(zip(
                r.time_ratios, r.memory_ratios, r.times, r.base_times, r.wall_times, r.memories, r.base_memories,
                strict=True,
            ))  # fmt: skip
            counts = list(zip(r.trainable, r.base_trainable, strict=True))
            if not rows:  # counted only
                writer.writerow([*head, "", *[""] * 7, *targets, *counted, "", *(counts[0] if counts else ("", ""))])
            for repeat, (tr, mr, t, bt, wt, m, bm) in enumerate(rows):
                writer.writerow(
                    [
                        *head,
                        repeat,
                        f"{tr:.4f}",
                        f"{mr:.4f}",
                        f"{t:.6f}",
                        f"{bt:.6f}",
                        f"{wt:.6f}",
                        f"{m / 2**20:.4f}",
                        f"{bm / 2**20:.4f}",
                        *targets,
                        *counted,
                        "",
                        *(counts[repeat] if counts else ("", "")),
                    ]
                )


def draw_chart(results: list[Result], path: Path, title: str, footer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"policy-only": "tab:blue", "online reference": "tab:orange", "cached reference": "tab:green"}
    rows = results[::-1]  # first row at the top
    # At least 4 inches, so that a table of a few rows leaves room for the axis labels above the footer
    # One panel per measure the results have: time and memory when timed, FLOPs and peak bytes when counted
    panels = []
    if any(r.times for r in results) or not any(r.flops is not None for r in results):
        panels += [
            ("time_ratios", "time_target", "time per optimizer step / TRL SFTTrainer"),
            ("memory_ratios", "memory_target", "peak memory / TRL SFTTrainer"),
        ]
    if any(r.flops is not None for r in results):
        panels += [
            ("flop_ratios", "flop_target", "FLOPs of a step / TRL SFTTrainer"),
            ("peak_ratios", "peak_target", "peak tensor bytes of a step / TRL SFTTrainer"),
        ]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), max(4.0, 0.3 * len(rows) + 2.4)), sharey=True, squeeze=False
    )
    axes = axes[0]
    y = list(range(len(rows)))
    for ax, (key, target_key, label) in zip(axes, panels):
        medians, lows, highs = zip(*(spread(getattr(r, key)) if not r.note else (math.nan,) * 3 for r in rows))
        finite = [v for v in highs if math.isfinite(v)]
        xmax = max([ONLINE_REFERENCE * 1.1, *(v * 1.05 for v in finite)])
        for i, (r, median, low, high) in enumerate(zip(rows, medians, lows, highs)):
            if r.note:
                ax.text(0.02, i, "n/a", va="center", fontsize=8, color="gray")
                continue
            if not math.isfinite(median):
                continue
            target = getattr(r, target_key)
            missed = target is not None and median > target
            ax.barh(i, median, color=colors[r.category], edgecolor="red" if missed else "none", linewidth=1.5)
            ax.errorbar(median, i, xerr=[[median - low], [high - median]], fmt="none", ecolor="black", capsize=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        for line, style in zip(TARGET_LINES, (":", "--", "-.")):
            ax.axvline(line, color="gray", linestyle=style, linewidth=1, label=f"target {line:g}")
        ax.set_xlim(0, xmax)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [row_label(r) for r in rows], fontsize=8)
    axes[0].set_ylim(-0.7, len(rows) - 0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    lines, names = axes[1].get_legend_handles_labels()
    # Above the panels, where it hides no bar
    fig.legend(
        [*handles, *lines], [*colors, *names], loc="upper center", bbox_to_anchor=(0.5, 0.985 - 0.25 / fig.get_figheight()),
        ncol=len(handles) + len(lines), fontsize=8, title="red edge: target missed", title_fontsize=8, frameon=False,
    )  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.005, footer, fontsize=7, family="monospace", wrap=True)
    # Room at the bottom for the footer's lines (about 0.15 inch each, wrapped lines included)
    lines = sum(1 + len(line) // 180 for line in footer.splitlines())
    fig.tight_layout(rect=(0, (0.15 * lines + 0.1) / fig.get_figheight(), 1, 1 - 0.9 / fig.get_figheight()))
    fig.savefig(path, dpi=120)
    plt.close(fig)


CHART_TITLE = "trl-priority overhead against TRL's SFTTrainer, {}"  # the machine


DETERMINISTIC_NOTE = (
    "FLOPs and peak tensor bytes of the second optimizer step, from the first step's end to just before "
    "`optimizer.step()` (micro-batch fetch, any scoring pass, every forward and backward with checkpointing's "
    "recomputation, the LM head and any reference forward): FLOPs of matrix products (torch's FlopCounterMode, 2 per "
    "multiply-add, with the CPU SDPA kernel and the in-place `addmm_` of TRL's fused head added); peak bytes the exact "
    "peak of the tensor storages allocated during the step and alive together (parameters, a reference copy's weights "
    "and optimizer state that exist before the step are excluded; `PeakTensorBytes`); LM-head GFLOP: the products that read an LM "
    "head's weight (or a vocabulary chunk of it) or write its gradient; TRL's value in brackets"
)


def write_table(results: list[Result], output: Path, header: dict[str, str], name: str = "overhead") -> None:
    """`{name}.md`: the header's lines (machine, model, command with its duration, git commit, ...) on top, then the
    table."""
    lines = "".join(f"- {key}: {value}\n" for key, value in header.items())
    (output / f"{name}.md").write_text(f"# Overhead against TRL's SFTTrainer\n\n{lines}\n{markdown_table(results)}\n")


def csv_number(row: dict, key: str, kind=float):
    """`row[key]` as a number, None when empty or absent (a CSV written before the column existed)."""
    return None if row.get(key, "") in ("", None) else kind(row[key])


def read_csv(path: Path) -> list[Result]:
    """The results of a run, back from its `overhead.csv` (for `--replot`)."""
    results: dict[tuple[str, str, str], Result] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            case = Case(row["mode"], row["method"], row["reference"])
            number = functools.partial(csv_number, row)
            if case not in results:
                targets = [number(k) for k in ("time_target", "memory_target")]
                results[case] = Result(case, row["category"], *targets, note=row["note"])
                results[case].flop_target, results[case].peak_target = (
                    number("flop_target"),
                    number("peak_bytes_target"),
                )
            if row["note"]:
                continue
            result = results[case]
            if number("flops") is not None:  # absent from a CSV written before the deterministic measures existed
                result.flops, result.base_flops = number("flops", int), number("trl_flops", int)
                result.peak_bytes, result.base_peak_bytes = number("peak_bytes", int), number("trl_peak_bytes", int)
                result.uncounted = row.get("uncounted_products", "")
                result.lm_head_flops = number("lm_head_flops", int)
                result.base_lm_head_flops = number("trl_lm_head_flops", int)
            if row["step_time_s"] == "":  # counted, not timed
                if row.get("trainable_parameters"):
                    result.trainable.append(int(row["trainable_parameters"]))
                    result.base_trainable.append(int(row["trl_trainable_parameters"]))
                continue
            result.times.append(float(row["step_time_s"]))
            result.base_times.append(float(row["trl_step_time_s"]))
            result.wall_times.append(float(row["wall_step_time_s"]))
            result.memories.append(float(row["peak_memory_mib"]) * 2**20)
            result.base_memories.append(float(row["trl_peak_memory_mib"]) * 2**20)
            if row.get("trainable_parameters"):  # absent from a CSV written before the column existed
                result.trainable.append(int(row["trainable_parameters"]))
                result.base_trainable.append(int(row["trl_trainable_parameters"]))
    return list(results.values())


def replot(output: Path, name: str = "overhead") -> None:
    """Redraw `{name}.md`'s table and `{name}.png` from `{name}.csv` and the header of `{name}.md`."""
    results = read_csv(output / f"{name}.csv")
    header = dict(
        line[2:].split(": ", 1) for line in (output / f"{name}.md").read_text().splitlines() if line.startswith("- ")
    )
    command, minutes = header["command"].rsplit(" (", 1)
    footer = f"{command.strip('`')}\n{header['model']}; {minutes.rstrip(')')}"
    write_table(results, output, header, name)
    draw_chart(results, output / f"{name}.png", CHART_TITLE.format(header["machine"]), footer)
    print(f"redrew {output / f'{name}.md'} and {output / f'{name}.png'} from {output / f'{name}.csv'}")


def git_commit() -> str:
    """The commit the measured code is at, and whether the work tree differs from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True).stdout  # noqa: E731
        commit = run("rev-parse", "HEAD").strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated, `name@word` for a granularity; all")
    parser.add_argument(
        "--modes",
        default="lora,full",
        help="comma-separated: lora, full, s2ft (the method with S2FT against TRL with LoRA); default lora,full",
    )
    parser.add_argument(
        "--s2ft-args",
        default=None,
        help="the s2ft mode's `structural_priority_args`, JSON (e.g. '{\"strategy\": \"random\"}'); default the recipe's",
    )
    parser.add_argument(
        "--full-methods",
        default=DEFAULT_FULL_METHODS,
        help=f"methods run in full fine-tuning (within --methods); 'all' for every one (default: {DEFAULT_FULL_METHODS})",
    )
    parser.add_argument("--references", default="online,cached", help="online, cached or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed TRL runs first (allocator, thread pools)")
    parser.add_argument("--baseline-every", type=int, default=4, help="TRL runs bracket blocks of this many cases")
    parser.add_argument("--steps", type=int, help="optimizer steps per run; the first is not timed")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step (default 1); with more, a step-wide selection scores them ahead",
    )
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu when CUDA is available, else cpu")
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="step time: wall time, or the process's CPU time (auto: wall on a GPU, cpu on the CPU)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the ratios: one run per case under torch.profiler, the seconds per step spent in each region "
        "the trainer marks (reference forward, step-wide scoring pass, policy forward, priority) and the top ops; "
        "writes overhead_profile.md",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="measure nothing: redraw the table and the chart in --output-dir from the overhead.csv a run wrote there",
    )
    parser.add_argument(
        "--measure",
        choices=("both", "time", "deterministic"),
        default="both",
        help="both (default): the timed repeats and one counted run per case; time: the timed repeats only; "
        "deterministic: only the FLOPs and peak tensor bytes of one step per case, no timing (fast, exact; writes "
        "overhead_deterministic.* unless --output-name)",
    )
    parser.add_argument("--output-dir", default="docs/benchmarks")
    parser.add_argument(
        "--output-name",
        help="file name stem of the table, CSV and chart (default overhead, or overhead_deterministic with "
        "--measure deterministic)",
    )
    cli = parser.parse_args(argv)
    cli.preset = cli.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    shape = dict(PRESETS[cli.preset])
    for key in ("steps", "batch_size", "seq_len", "hidden", "layers", "vocab"):
        if getattr(cli, key) is not None:
            shape[key] = getattr(cli, key)
    if cli.hidden is not None:  # keep the preset's proportions
        shape["intermediate"] = 3 * cli.hidden
        shape["heads"] = max(1, cli.hidden // 64)
        shape["kv_heads"] = max(1, shape["heads"] // 2)
    cli.shape = shape
    for key in ("steps", "batch_size", "seq_len"):
        setattr(cli, key, shape[key])
    if cli.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    cli.s2ft_args = json.loads(cli.s2ft_args) if cli.s2ft_args else None
    if cli.output_name is None:
        cli.output_name = "overhead_deterministic" if cli.measure == "deterministic" and not cli.replot else "overhead"
    cli.bf16 = torch.cuda.is_available()
    if cli.clock == "auto":
        cli.clock = "wall" if torch.cuda.is_available() else "cpu"
    return cli


def build_cases(cli) -> list[Result]:
    names = available_priorities()
    methods = names if cli.methods == "all" else [m.strip() for m in cli.methods.split(",") if m.strip()]
    full_methods = names if cli.full_methods == "all" else cli.full_methods.split(",")
    for method in methods:
        get_priority(method.split("@")[0])  # an unknown name fails here, with the closest one
    references = cli.references.split(",")
    results = []
    for mode in cli.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; use one or more of {', '.join(MODES)}")
        for method in methods:
            if mode == "full" and method.split("@")[0] not in full_methods and method not in full_methods:
                continue
            for reference in references:
                case = Case(mode, method, reference)
                category, time_target, memory_target, note = classify(case)
                if category == "policy-only":
                    if reference != references[0]:
                        continue  # a method without a reference has one row
                    case = Case(mode, method, "-")
                result = Result(case, category, time_target, memory_target, note)
                result.flop_target, result.peak_target = deterministic_targets(case, time_target, memory_target)
                results.append(result)
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    cli = parse_args(argv)
    if cli.replot:
        replot(Path(cli.output_dir), cli.output_name)
        return read_csv(Path(cli.output_dir) / f"{cli.output_name}.csv")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    shape = cli.shape
    tokenizer = make_tokenizer(shape["vocab"])
    prompt_len = cli.seq_len // 4
    examples = cli.batch_size * cli.gradient_accumulation_steps * cli.steps
    dataset = make_dataset(examples, prompt_len, cli.seq_len - prompt_len, tokenizer)
    base = make_model(shape, torch.bfloat16 if cli.bf16 else torch.float32)
    results = build_cases(cli)
    command = "python scripts/benchmark_overhead.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    description = (
        f"{shape['model']} {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters (vocab {shape['vocab']}, "
        f"hidden {shape['hidden']}, {shape['layers']} layers{', bf16' if cli.bf16 else ', fp32'}), batch "
        f"{cli.batch_size} x {cli.seq_len} tokens"
        + (f" x {cli.gradient_accumulation_steps} accumulation steps" if cli.gradient_accumulation_steps > 1 else "")
        + f", gradient checkpointing on, {cli.steps} steps per run (first "
        + (
            "not profiled), one profiled run per case, wall clock"
            if cli.profile
            else "not counted; the second is, and training stops there), one counted run per case"
            if cli.measure == "deterministic"
            else f"untimed), {cli.repeats} repeats, step time on the {cli.clock} clock"
            + ("; one counted run per case" if cli.measure == "both" else "")
        )
    )
    if "s2ft" in cli.modes.split(","):
        description += f"; s2ft mode: structural_priority_args {json.dumps(cli.s2ft_args or {})}, TRL with LoRA r 16"
    print(f"machine: {machine()}\nmodel: {description}\ncases: {sum(not r.note for r in results)}", flush=True)

    commit = git_commit()  # the code measured: read before the run, which may last while the tree changes
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir, tempfile.TemporaryDirectory() as cache_dir:
        # The cached cases' reference statistics, computed once before anything is timed (a fresh cache per run)
        cli.ref_cache_dir = cache_dir
        for result in results:
            if result.case.reference == "cached" and not result.note:
                fill_cache(result.case, base, dataset, tokenizer, cli, output_dir)
        if cli.profile:
            report = profile_cases(results, base, dataset, tokenizer, cli, output_dir)
        if not cli.profile and cli.measure != "time":
            for mode in dict.fromkeys(r.case.mode for r in results):
                rows = [r for r in results if r.case.mode == mode]
                measure_deterministic(rows, mode, base, dataset, tokenizer, cli, output_dir)
        if not cli.profile and cli.measure != "deterministic":
            # Untimed runs first: allocator, thread pools and caches warm up before anything is compared
            for _ in range(cli.warmup):
                run_once(
                    Case(results[0].case.mode if results else "lora", None), base, dataset, tokenizer, cli, output_dir
                )
            for mode in dict.fromkeys(r.case.mode for r in results):
                rows = [r for r in results if r.case.mode == mode]
                measure(rows, mode, base, dataset, tokenizer, cli, output_dir)
    minutes = (time.perf_counter() - started) / 60
    output = Path(cli.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if cli.profile:
        (output / "overhead_profile.md").write_text(
            f"# Where the time goes: one profiled run per case\n\n- machine: {machine()}\n- model: {description}\n"
            f"- command: `{command}` ({minutes:.0f} min)\n- seconds per optimizer step (wall clock), regions "
            "inclusive and summed over their calls in a step (`step_selection` contains the scoring pass's own reference "
            "and policy forwards); what no region covers is the backward, the optimizer and data loading\n\n"
            + report
            + "\n"
        )
        print(f"wrote {output / 'overhead_profile.md'}")
        return results

    footer = f"{command}\n{description}; {minutes:.0f} min"
    print(f"\n{markdown_table(results)}\n\n{footer}")
    header = {"machine": machine(), "model": description, "command": f"`{command}` ({minutes:.0f} min)"}
    header["git commit"] = commit
    if cli.measure != "time":
        header["deterministic measures"] = DETERMINISTIC_NOTE
    name = cli.output_name
    write_table(results, output, header, name)
    write_csv(results, output / f"{name}.csv")
    draw_chart(results, output / f"{name}.png", CHART_TITLE.format(machine()), footer)
    print(f"wrote {output / f'{name}.md'}, {output / f'{name}.csv'}, {output / f'{name}.png'}")
    return results


if __name__ == "__main__":
    main()
