"""The per-token statistics a priority may read, and how they are computed.

Every per-token statistic is a tensor of shape `(batch, seq_len - 1)` aligned like TRL's fused-head `log_probs`:
position t scores the label `labels[:, t + 1]`. Priorities name the statistics they need as positional parameters:

| name              | source    | meaning                                                                          |
|-------------------|-----------|----------------------------------------------------------------------------------|
| `mask`            | labels    | the label is supervised (not -100)                                               |
| `logps`           | policy    | log π_θ(y_t), from TRL's fused LM head, no gradient                              |
| `entropy`         | policy    | entropy of π_θ(· given y_<t), fused head                                         |
| `mass`            | policy    | Σ_v π(v)·1[π(v) < π(y_t)] + π(y_t): probability mass at or below the label       |
| `topk_entropy`    | policy    | entropy of the top-k renormalised next-token distribution (hyperparameter `k`)   |
| `image_attention` | policy    | attention mass on image tokens (VLMs, eager attention, last `attention_layers`)  |
| `ref_<name>`      | reference | any policy statistic above, under the frozen reference                           |
| data statistics   | data      | per-token, per-example or span columns of the dataset (`DATA_STATISTICS`, open)  |
| `progress`        | trainer   | fraction of training done, a scalar in [0, 1] (global_step / max_steps)          |
| `state`           | trainer   | the method's `TokenState`: per-token history kept across steps and checkpoints   |
| `selected`        | trainer   | bool: the token is in the method's top-fraction selection (see `TopFraction`)    |

`logps` and `entropy` come from TRL's fused LM head, which never builds the `(batch, seq, vocab)` logits. The
*distribution* statistics (`mass`, `topk_entropy`) and the differentiable *distribution terms* of a method's objective
(`trl_priority.objectives.DistributionTerm`: a KL anchor, a soft-target cross-entropy) need the whole next-token
distribution. They are computed inside the model's own forward (`add_distribution_head`), where ZeRO-3 and FSDP have
gathered the LM head, from the final hidden states projected a few hundred supervised positions at a time in float32,
so memory grows with `chunk × vocab`, never `batch × seq × vocab`.

Adding a distribution statistic is one function registered in `DISTRIBUTION_STATISTICS`; adding a data statistic is
one `register_data_statistic` call (the column is then carried through truncation, padding, padding-free and packing
by `trl_priority.data`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import trl.kernels.chunked_logprob as _trl_kernel
import trl.trainer.utils as _trl_utils
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .signatures import hyperparameter_names


try:  # TRL's own fp32-accumulating projection helpers (trl>=1.16; the pin in pyproject keeps them)
    from trl.kernels.chunked_logprob import _addmm_fp32
except ImportError:  # pragma: no cover

    def _addmm_fp32(acc, a, b):
        acc.addmm_(a.float(), b.float())


# ------------------------------------------------------------------------------------------------------------------
# Distribution statistics: pure functions of a chunk of next-token log-probabilities.
#   logprobs: (n, V) float32, log-softmax of the next-token logits at n supervised positions (the logits themselves
#             for a statistic registered `shift_invariant`, when no other statistic needs the log-softmax)
#   labels:   (n,)   the label at each position
#   returns:  (n,)
# ------------------------------------------------------------------------------------------------------------------
def mass(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """u_t = Σ_v q(v)·1[q(v) < q(y_t)] + q(y_t): the probability mass of the tokens no more likely than the label.

    Used by PriFT-mass (arXiv 2606.09396). Ties with the label count once, through the q(y_t) term: a token with
    exactly the label's probability is not "less likely". u_t is in (0, 1]; it is 1 when y_t is the argmax.
    """
    target = logprobs.gather(1, labels[:, None])  # (n, 1)
    below = torch.where(logprobs < target, logprobs.exp(), 0.0)  # (n, V)
    return below.sum(-1) + target.squeeze(1).exp()  # (n,)


def topk_entropy(logprobs: torch.Tensor, labels: torch.Tensor, *, k: int) -> torch.Tensor:
    """H_top-k = −Σ_{i ≤ k} p̃_i log p̃_i, with p̃ the softmax of the k largest logits (renormalised top-k).

    Used by EAFT (arXiv 2601.02151) as a cheap estimate of the token entropy; it lies in [0, ln k].
    """
    top = logprobs.topk(min(k, logprobs.size(-1)), dim=-1).values  # (n, k)
    top = top.log_softmax(-1)  # renormalise over the top k
    return -(top.exp() * top).sum(-1)  # (n,)


@dataclass(frozen=True)
class DistributionStatistic:
    """A distribution statistic's function. `shift_invariant`: `fn` gives the same value when every row of its input
    is shifted by a constant, so it may be given the logits instead of the log-probabilities (log_softmax subtracts
    one constant per row), and the fused head skips the `(n, V)` log-softmax when no other statistic needs it."""

    fn: Callable[..., torch.Tensor]
    shift_invariant: bool = False

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        return hyperparameter_names(self.fn)


DISTRIBUTION_STATISTICS: dict[str, DistributionStatistic] = {
    "mass": DistributionStatistic(mass),
    "topk_entropy": DistributionStatistic(topk_entropy, shift_invariant=True),  # renormalised over the top k
}

# Statistic name -> field of TRL's `FusedCausalLMOutput`
FUSED_STATISTICS = {"logps": "log_probs", "entropy": "entropy"}

# The fused statistics computed from a chunk instead, when the chunks are projected anyway
_FUSED_FROM_CHUNK = {
    "logps": DistributionStatistic(lambda logprobs, labels: logprobs.gather(1, labels[:, None]).squeeze(1)),
    "entropy": DistributionStatistic(lambda logprobs, labels: -(logprobs.exp() * logprobs).sum(-1)),
}


# ------------------------------------------------------------------------------------------------------------------
# Attention statistics: pure functions of the attention weights of the decoder layers a method reads.
#   weights: list over the layers read of (B, heads, T, T) attention probabilities (eager attention), no gradient
#   inputs:  the model inputs (input_ids, ...);  model_config: the model's config (e.g. its image token id)
#   returns: (B, T-1), aligned like `logps`
# ------------------------------------------------------------------------------------------------------------------
def image_attention(weights: list[torch.Tensor], inputs: Mapping[str, Any], model_config) -> torch.Tensor:
    """a_t = mean over the layers read and their heads of Σ_{k: image token} A[t, k]: the attention mass the query
    at position t (the position that predicts `labels[:, t + 1]`, as `logps` is aligned) puts on image tokens.

    Used by PAINT (Arif et al. 2025, arXiv 2501.12206). The image tokens are those of `input_ids` equal to the
    model's `image_token_id` (or `image_token_index`).
    """
    image_token = getattr(model_config, "image_token_id", None)
    image_token = getattr(model_config, "image_token_index", None) if image_token is None else image_token
    if image_token is None:
        raise ValueError(
            f"`image_attention` needs a vision-language model with an `image_token_id` in its config; "
            f"{type(model_config).__name__} has none."
        )
    is_image = (inputs["input_ids"] == image_token).to(weights[0].dtype)  # (B, T)
    mass = torch.stack([layer @ is_image[:, None, :, None] for layer in weights])  # (L, B, heads, T, 1)
    return mass.squeeze(-1).mean(dim=(0, 2))[:, :-1].float()  # (B, T-1)


@dataclass(frozen=True)
class AttentionStatistic:
    """An attention statistic: `fn(weights, inputs, model_config)`, and the priority hyperparameter naming how many
    of the last decoder layers it reads (only those are captured)."""

    fn: Callable[..., torch.Tensor]
    layers_hyperparameter: str = "attention_layers"


ATTENTION_STATISTICS: dict[str, AttentionStatistic] = {"image_attention": AttentionStatistic(image_attention)}

POLICY_STATISTICS = (*FUSED_STATISTICS, *DISTRIBUTION_STATISTICS, *ATTENTION_STATISTICS)


@contextmanager
def captured_attention(causal_lm, num_layers: int):
    """While the block runs, the attention weights `(B, heads, T, T)` of the last `num_layers` decoder layers are
    appended to the yielded list (forward hooks on their `self_attn`; the model must run eager attention, which
    returns them). Other layers keep whatever attention kernel they use."""
    decoder = causal_lm.get_decoder()
    layers = list(decoder.layers)[-num_layers:]
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise ValueError(
                "An attention statistic (`image_attention`) reads attention weights, which this model's attention "
                "kernel does not return: load the model with `attn_implementation='eager'` (`--attn_implementation "
                "eager`)."
            )
        captured.append(weights.detach())

    handles = [layer.self_attn.register_forward_hook(keep) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------------------
# Data statistics: an open registry, like the priorities.
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataStatistic:
    """A column of the dataset read as a per-token statistic, aligned like `logps` (shifted by one).

    Attributes:
        column: the dataset column.
        level: "token" (a list with one value per token of `input_ids`), "example" (one number per example,
            broadcast to all of its tokens before truncation and packing) or "span" (a list of `[start, end]` or
            `[start, end, value]` character offsets into the completion text; the tokens that overlap a span get its
            value, default 1).
        padding: the value on tokens outside the example (padding), and, for spans, on tokens outside every span.
        hint: how a dataset gets this column, shown when it is missing.
        generated: the trainer makes the column itself (the per-token identity), the dataset need not have it.
        derive: for a span statistic found in the text itself, `derive(completion, priority_args) -> spans`: the
            column is made from the completion as the model sees it (a final-answer marker, a checker's verdicts).
            An example that has the column itself (spans, not None) keeps its own spans: labels win over derivation.
        enumerate_spans: a span statistic whose value is the span's number (1, 2, ...): span identities.
        compute: for a token statistic made from the raw example itself, `compute(example, tokenizer, index,
            priority_args) -> one value per token of input_ids`: the tokenized row still carries its raw fields
            (`messages`, `prompt`, `completion`, other columns), so a value can come from them (per-message weights).
    """

    column: str
    level: Literal["token", "example", "span"] = "token"
    padding: float = 0.0
    hint: str = ""
    generated: bool = False
    derive: Callable[[str, Mapping[str, Any]], list] | None = None
    enumerate_spans: bool = False
    compute: Callable[[Mapping[str, Any], Any, int, Mapping[str, Any]], list] | None = None


DATA_STATISTICS: dict[str, DataStatistic] = {}

# Statistics the trainer provides: training progress, the method's state, its selection
TRAINER_STATISTICS = ("progress", "state", "selected")


def _source_of_builtin(name: str) -> str | None:
    if name == "mask":
        return "labels"
    if name in POLICY_STATISTICS:
        return "policy"
    if name.startswith("ref_") and name[4:] in POLICY_STATISTICS:
        return "reference"
    if name in TRAINER_STATISTICS:
        return "trainer"
    return None


def register_data_statistic(
    name: str,
    *,
    column: str | None = None,
    level: Literal["token", "example", "span"] = "token",
    padding: float = 0.0,
    hint: str = "",
    derive: Callable[[str, Mapping[str, Any]], list] | None = None,
    enumerate_spans: bool = False,
    compute: Callable[[Mapping[str, Any], Any, int, Mapping[str, Any]], list] | None = None,
    overwrite: bool = False,
) -> DataStatistic:
    """Make a dataset column readable by priorities as the statistic `name` (the column defaults to `name`).

    ```python
    register_data_statistic("difficulty", level="example")  # a number per example, broadcast to its tokens
    @register_priority(regime="soft")
    def easy_first(difficulty, mask, *, gamma: float = 1.0):
        return torch.exp(-gamma * difficulty) * mask
    ```
    """
    if level not in ("token", "example", "span"):
        raise ValueError(f"Data statistic '{name}': level {level!r} is not one of 'token', 'example', 'span'.")
    if (name in DATA_STATISTICS or _source_of_builtin(name) is not None) and not overwrite:
        raise ValueError(f"A statistic named '{name}' already exists; pass `overwrite=True` to replace it.")
    if derive is not None and level != "span":
        raise ValueError(f"Data statistic '{name}': `derive` makes spans, so its level must be 'span'.")
    if compute is not None and level != "token":
        raise ValueError(
            f"Data statistic '{name}': `compute` makes one value per token, so its level must be 'token'."
        )
    hint = hint or f"add a '{column or name}' column"
    generated = derive is not None or compute is not None
    statistic = DataStatistic(
        column or name, level, float(padding), hint, generated, derive, enumerate_spans, compute=compute
    )
    DATA_STATISTICS[name] = statistic
    return statistic


register_data_statistic(
    "response_mask",
    column="completion_mask",
    hint="TRL builds it from prompt-completion datasets (columns 'prompt' and 'completion', standard or "
    "conversational), or give a tokenized dataset a 'completion_mask' column (1 on response tokens)",
)
# The per-token identity, made by the trainer: which example a token comes from and where it stood in it. It survives
# shuffling, padding, padding-free and packing, so stateful methods key their history by it.
DATA_STATISTICS["example_index"] = DataStatistic("example_index", "example", -1.0, generated=True)
DATA_STATISTICS["token_position"] = DataStatistic("token_position", "token", -1.0, generated=True)
# The word each token belongs to (from the decoded tokens), for pooling Φ over whole words
DATA_STATISTICS["word_index"] = DataStatistic("word_index", "token", -1.0, generated=True)
# Labelled spans over the completion, numbered 1, 2, ...: the units of `priority_granularity="span"`
register_data_statistic(
    "span_index",
    column="spans",
    level="span",
    enumerate_spans=True,
    hint="`priority_granularity='span'` pools Φ over labelled spans: a 'spans' column of [start, end] character "
    "offsets into each completion",
)


def source_of(name: str) -> str | None:
    """'labels', 'policy', 'reference', 'data' or 'trainer'; None for a name that is no statistic."""
    builtin = _source_of_builtin(name)
    if builtin is not None:
        return builtin
    return "data" if name in DATA_STATISTICS else None


def known_statistics() -> list[str]:
    return [
        "mask",
        *POLICY_STATISTICS,
        *(f"ref_{name}" for name in POLICY_STATISTICS),
        *DATA_STATISTICS,
        *TRAINER_STATISTICS,
    ]


def hyperparameters_of(name: str) -> tuple[str, ...]:
    """Hyperparameters of the priority that a statistic is computed with (e.g. `k` for `topk_entropy`)."""
    base = name[4:] if name.startswith("ref_") else name
    if base in ATTENTION_STATISTICS:
        return (ATTENTION_STATISTICS[base].layers_hyperparameter,)
    return DISTRIBUTION_STATISTICS[base].hyperparameters if base in DISTRIBUTION_STATISTICS else ()


# ------------------------------------------------------------------------------------------------------------------
# The LM head, also when sharded
# ------------------------------------------------------------------------------------------------------------------
def causal_lm_of(model) -> torch.nn.Module:
    """The `PreTrainedModel` that carries the LM head, under DDP/FSDP wrappers and PEFT."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vocab_size_of(causal_lm) -> int:
    """Rows of the LM head, read so that it also holds when the weight is sharded.

    Under DeepSpeed ZeRO-3 the local weight has 0 elements and the full shape is `ds_shape`; an FSDP2 DTensor reports
    its global shape; an FSDP1 flat parameter keeps `out_features` on the module.
    """
    head = causal_lm.get_output_embeddings()
    weight = head.weight
    if hasattr(weight, "ds_shape"):
        return int(weight.ds_shape[0])
    if weight.dim() == 2 and weight.numel() > 0 and not is_quantized_weight(weight):
        return int(weight.shape[0])
    # A bitsandbytes head packs its weight (4-bit: `(V·H/2, 1)` bytes), so its shape is no guide
    return int(getattr(head, "out_features", None) or causal_lm.config.get_text_config().vocab_size)


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """A bitsandbytes weight: 4-bit `Params4bit` (packed, with a `quant_state`, stored as uint8 or as the
    `bnb_4bit_quant_storage` float dtype) or 8-bit `Int8Params` (int8)."""
    return hasattr(weight, "quant_state") or not weight.is_floating_point()


def dequantize_lm_head(causal_lm) -> bool:
    """Replace a 4-bit bitsandbytes LM head of `causal_lm` by a frozen `nn.Linear` with the same weight, dequantized.

    transformers keeps the LM head unquantized when it loads a model in 4-bit (it skips the output embeddings), but a
    `BitsAndBytesConfig(llm_int8_skip_modules=[...])` that does not name it quantizes it too. TRL's fused LM head and
    the chunked pass here project with `head.weight` itself, which a 4-bit head stores packed: dequantizing it once
    gives the logits the quantized head computes (`Linear4bit` dequantizes the same weight on every call), at the cost
    of `V × H` values of its compute dtype. Returns whether the head was replaced. An 8-bit head cannot be turned back
    into the weight it multiplies with the same numerics, so it is an error.
    """
    head = causal_lm.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or not is_quantized_weight(weight):
        return False
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or hasattr(head, "base_layer"):  # 8-bit, or a PEFT layer around the quantized head
        raise ValueError(
            f"The LM head ({type(head).__name__}) is quantized in a way the per-token statistics cannot project with "
            "(8-bit, or an adapter on a quantized head). Keep the LM head unquantized: transformers does so by default; "
            "if you set `llm_int8_skip_modules` in the `BitsAndBytesConfig`, add 'lm_head' to it."
        )
    import bitsandbytes

    dtype = getattr(head, "compute_dtype", None) or quant_state.dtype
    dense = bitsandbytes.functional.dequantize_4bit(weight.data, quant_state).to(dtype)  # (V, H)
    linear = torch.nn.Linear(*dense.shape[::-1], bias=head.bias is not None, device=dense.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(dense)
        if head.bias is not None:
            linear.bias.copy_(head.bias.to(dtype))
    linear.requires_grad_(False)
    causal_lm.set_output_embeddings(linear)
    return True


def _logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) the model applies to its LM-head output; mirrors `trl.trainer.utils.add_fused_lm_head`."""
    text_config = config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scale = (
            text_config.logits_scaling if text_config.model_type == "hyperclovax" else 1 / text_config.logits_scaling
        )
    return (1.0 if scale is None else scale), getattr(text_config, "final_logit_softcapping", None)


@dataclass
class _Head:
    """An LM head ready to project: full weight (gathered), bias, logit transform and compute dtype."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None

    def logits_fp32(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`(n, V)` float32 raw logits of `hidden` `(n, H)`: products in `dtype`, accumulated in float32.

        Rounding the logits to bf16 before the softmax would cost about 1e-2 in log-probability. (TRL's fused head
        rounds its tile to the compute dtype for `log_probs`; the distribution statistics keep float32 logits.)
        """
        hidden = hidden.to(dtype)
        weight = self.weight.to(dtype)
        # The dtypes are explicit here: under autocast (CPU's puts `mm` in bf16) the product would be rounded to bf16
        with torch.autocast(hidden.device.type, enabled=False):
            if hidden.device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
                logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
            else:
                logits = torch.mm(hidden.float(), weight.float().t())
        if self.bias is not None:
            logits = logits + self.bias.float()
        return logits

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:  # most models: no copy of the (n, V) chunk
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


@contextmanager
def gathered_head(causal_lm):
    """The LM head of `causal_lm`, whole, for the duration of the block (ZeRO-3 gathered, FSDP2 DTensor made full)."""
    head = causal_lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    with maybe_gather_lm_head_ctx(weight, bias):
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: differentiable all-gather, as TRL's fused head does
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        scale, softcap = _logit_transform(causal_lm.config)
        yield _Head(weight, bias, scale, softcap)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


# Positions × vocabulary entries per LM-head chunk of the chunked passes; None: by device (`chunk_elements_for`)
CHUNK_ELEMENTS: int | None = None


def chunk_elements_for(device: torch.device, requested: int | None = None) -> int:
    """Positions × vocabulary entries per chunk: `requested`, else `CHUNK_ELEMENTS`, else by device.

    On CUDA 2^24 (64 MiB of float32 logits, e.g. 110 positions of a 152k vocabulary): the GEMM needs rows to be
    efficient, and the LM head's weight is read once per chunk. Elsewhere 2^22 (16 MiB): a pass holds several
    `(n, V)` float32 tensors at once (logits, log-probabilities, their gradient, a reference's), and on the CPU
    benchmark's model (49k vocabulary) 2^24 made them 1.25-1.37x TRL's peak memory for asft and target_sft against
    0.98-1.09x at 2^22, at no cost in time.
    """
    if requested:
        return requested
    if CHUNK_ELEMENTS:
        return CHUNK_ELEMENTS
    return 2**24 if torch.device(device).type == "cuda" else 2**22


# ------------------------------------------------------------------------------------------------------------------
# The request a forward carries, and the chunked pass that serves it
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceDistribution:
    """The reference's final hidden states and the model whose LM head projects them, for distribution terms.

    `statistics` are reference statistics (no `ref_` prefix) to compute from the same projection, in the policy's
    pass: the reference's LM head then runs once per position, not once for its statistics and again for the terms.
    """

    hidden: torch.Tensor  # (B, T, H_ref), no gradient
    causal_lm: torch.nn.Module
    statistics: tuple[str, ...] = ()


@dataclass
class DistributionRequest:
    """What a forward computes besides TRL's fused log-probabilities; the forward writes its results here.

    Passed to the model as the keyword `distribution_request` (inside a `_Untouched`, see there); the results come
    back in the request itself, not in the model output, so no wrapper (DDP, FSDP, accelerate's fp32 output
    conversion) can drop them.
    """

    statistics: tuple[str, ...] = ()  # no-gradient distribution statistics (and `logps` / `entropy` for a reference)
    args: Mapping[str, Any] = field(default_factory=dict)
    terms: tuple[Any, ...] = ()  # `DistributionTerm`s: differentiable, summed over the supervised positions
    term_weights: tuple[float, ...] = ()
    term_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)  # (B, T-1) per-token inputs of the terms
    reference: ReferenceDistribution | None = None
    backbone_only: bool = False  # a reference: run the backbone alone, no fused head
    # Called inside the forward once the fused head and the statistics are done, before the terms are projected:
    # `before_terms(outputs, request)` fills `term_inputs` (Φ, policy statistics) and may set `rows`. For terms that
    # read what only this forward computes (`priority`, `logps`, ...): `_statistics_then_terms`.
    before_terms: Callable[[Any, DistributionRequest], None] | None = None
    rows: torch.Tensor | None = None  # (B, T-1) bool: project the terms at these supervised positions only
    chunk_elements: int | None = None  # positions × vocabulary per chunk; None: `chunk_elements_for`, at call time
    label_length: int | None = None  # the caller's T: a longer forward has PEFT's virtual tokens first
    # Results
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # statistic -> (B, T-1), no gradient
    term_values: dict[str, torch.Tensor] = field(default_factory=dict)  # term -> (B, T-1) per token, no gradient
    term_total: torch.Tensor | None = None  # Σ_terms w · Σ_t term_t, with gradient
    hidden: torch.Tensor | None = None  # the final hidden states, when `backbone_only`


class _Untouched:
    """A `DistributionRequest` on its way into a model's forward, hidden from the wrappers that map its arguments.

    FSDP2 with a mixed-precision policy casts the floating tensors of the forward's arguments to bf16 with
    `torch.distributed.utils._apply_to_tensors`, which rebuilds every dataclass, dict and list it walks: a request
    passed as such arrives as a copy, the forward fills the copy, and the caller's request stays empty (a
    reference's hidden states None; found by running asft under FSDP2 in bf16). An object of a plain class with
    slots is passed through as it is.
    """

    __slots__ = ("request",)

    def __init__(self, request: DistributionRequest):
        self.request = request


class _ChunkedTerms(torch.autograd.Function):
    """Σ_terms w_i · Σ_rows term_i(log_softmax(h W^T)) with gradient to `h` and `W`, chunk by chunk.

    As in Liger-Kernel's chunked losses and TRL's chunked kernels, the gradient is computed during the forward, one
    chunk of positions at a time, and stored: the backward only scales it, so it never projects again (nor needs the
    LM head gathered again under ZeRO-3). Inside a chunk, the term's own gradient with respect to the logits comes from
    autograd, so a term is a plain function of `(n, V)` log-probabilities.
    """

    @staticmethod
    def forward(ctx, rows_hidden, weight, bias, run):  # run: a closure over the chunk loop
        total, grad_hidden, grad_weight, grad_bias = run(rows_hidden, weight, bias)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (rows_hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors

        def scaled(grad, has, dtype):
            return (grad * grad_total.float()).to(dtype) if has else None

        grads = (grad_hidden, grad_weight, grad_bias)
        return (*(scaled(g, h, d) for g, h, d in zip(grads, ctx.has, ctx.dtypes)), None)


def _distribution_pass(hidden: torch.Tensor, labels: torch.Tensor, causal_lm, request: DistributionRequest) -> None:
    """Compute the request's statistics and terms at the supervised positions of `hidden` `(B, T, H)`."""
    shifted = labels[:, 1:].to(hidden.device)  # (B, T-1)
    mask = shifted != -100  # (B, T-1)
    if request.rows is not None:
        mask = mask & request.rows.to(mask.device)  # (B, T-1)
    rows_hidden = hidden[:, :-1][mask]  # (N, H): only supervised positions are projected
    rows_labels = shifted[mask]  # (N,)
    num_rows = rows_labels.numel()
    names = list(request.statistics)
    stats = {name: DISTRIBUTION_STATISTICS.get(name) or _FUSED_FROM_CHUNK[name] for name in names}
    stat_kwargs = {name: {hp: request.args[hp] for hp in stat.hyperparameters} for name, stat in stats.items()}
    values = {name: hidden.new_zeros(num_rows, dtype=torch.float32) for name in names}
    ref_names = request.reference.statistics if request.reference is not None else ()
    ref_stats = {name: DISTRIBUTION_STATISTICS.get(name) or _FUSED_FROM_CHUNK[name] for name in ref_names}
    ref_kwargs = {name: {hp: request.args[hp] for hp in stat.hyperparameters} for name, stat in ref_stats.items()}
    values.update({f"ref_{name}": hidden.new_zeros(num_rows, dtype=torch.float32) for name in ref_names})
    terms = request.terms
    term_values = {term.name: hidden.new_zeros(num_rows, dtype=torch.float32) for term in terms}
    term_rows = {name: value.to(hidden.device)[mask] for name, value in request.term_inputs.items()}  # (N,) each
    term_rows.update({f"ref_{name}": values[f"ref_{name}"] for name in ref_names})  # filled chunk by chunk
    dtype = _compute_dtype(hidden)

    ref_context, topk_rows = nullcontext(None), None
    if isinstance(request.reference, ReferenceDistribution):
        ref_context = gathered_head(request.reference.causal_lm)
    elif request.reference is not None:  # a cached top-k (`trl_priority.topk_reference.TopKReferenceDistribution`)
        topk_rows = request.reference.rows(mask)  # (N, k) rows, aligned with `rows_labels`
    with gathered_head(causal_lm) as head, ref_context as ref_head:
        vocab = head.weight.shape[0]
        chunk_rows = max(1, chunk_elements_for(hidden.device, request.chunk_elements) // vocab)
        ref_rows_hidden = None
        if ref_head is not None:
            ref_rows_hidden = request.reference.hidden[:, :-1][mask].to(hidden.device)  # (N, H_ref)
            ref_dtype = _compute_dtype(request.reference.hidden)

        # The policy's head is projected for its statistics, the terms, or a top-k reference's tail (shaped like it)
        project_policy = bool(names or terms) or topk_rows is not None or ref_head is None

        def chunks():
            """Per chunk: its rows, the policy's float32 logits, and `reference_of(policy_logprobs)`, which gives the
            reference's log-probabilities (and fills its statistics) once the policy's, detached, are known."""
            for start in range(0, num_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                raw = None
                if project_policy:
                    with torch.no_grad():
                        raw = head.logits_fp32(rows_hidden[rows].detach(), dtype)  # (n, V) float32

                @torch.no_grad()
                def reference_of(policy_logprobs, rows=rows):
                    ref_logprobs = None
                    if ref_head is not None:
                        ref_raw = ref_head.logits_fp32(ref_rows_hidden[rows], ref_dtype)
                        ref_logprobs = ref_head.transform(ref_raw).log_softmax(-1)  # (n, V)
                    elif topk_rows is not None:  # π̂ rebuilt, the tail shaped like this chunk's policy (detached)
                        ref_logprobs = topk_rows.logprobs(rows, rows_labels[rows], policy_logprobs)  # (n, V)
                    if ref_logprobs is not None:
                        for name, stat in ref_stats.items():
                            values[f"ref_{name}"][rows] = stat.fn(ref_logprobs, rows_labels[rows], **ref_kwargs[name])
                    return ref_logprobs

                yield rows, raw, reference_of

        def run(rows_hidden_, weight, bias):
            needs_grad = rows_hidden_.requires_grad or weight.requires_grad
            grad_hidden = torch.zeros_like(rows_hidden_, dtype=torch.float32) if rows_hidden_.requires_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
            grad_bias = (
                torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
            )
            total = rows_hidden_.new_zeros((), dtype=torch.float32)
            for rows, raw, reference_of in chunks():
                if raw is None:  # a model reference's statistics alone: the policy's head is not projected
                    reference_of(None)
                    continue
                with torch.enable_grad():
                    raw = raw.requires_grad_(needs_grad)
                    logprobs = head.transform(raw).log_softmax(-1)  # (n, V)
                    ref_logprobs = reference_of(logprobs.detach())  # the policy's log-softmax, computed once
                    with torch.no_grad():
                        for name, stat in stats.items():
                            values[name][rows] = stat.fn(logprobs.detach(), rows_labels[rows], **stat_kwargs[name])
                    chunk_total = raw.new_zeros(())
                    for term, term_weight in zip(terms, request.term_weights):
                        per_row = term(logprobs, rows_labels[rows], ref_logprobs, term_rows, rows, request.args)
                        term_values[term.name][rows] = per_row.detach().float()
                        chunk_total = chunk_total + term_weight * per_row.sum()
                if terms and needs_grad:
                    (grad_raw,) = torch.autograd.grad(chunk_total, raw)  # (n, V) float32
                    grad_raw = grad_raw.to(dtype)
                    h = rows_hidden_[rows].detach().to(dtype)
                    if grad_hidden is not None:
                        _addmm_fp32(grad_hidden[rows], grad_raw, head.weight.detach().to(dtype))
                    if grad_weight is not None:
                        _addmm_fp32(grad_weight, grad_raw.t(), h)
                    if grad_bias is not None:
                        grad_bias += grad_raw.sum(0, dtype=torch.float32)
                total = total + chunk_total.detach()
            return total, grad_hidden, grad_weight, grad_bias

        if terms:
            request.term_total = _ChunkedTerms.apply(rows_hidden, head.weight, head.bias, run)
        else:
            with torch.no_grad():
                run(rows_hidden.detach(), head.weight.detach(), None)

    for name, rows_value in {**values, **term_values}.items():
        full = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)  # (B, T-1)
        full[mask] = rows_value
        (request.values if name in values else request.term_values)[name] = full


# ------------------------------------------------------------------------------------------------------------------
# The policy's distribution statistics from the fused head's own tiles: one LM-head projection, not two
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class _TileStatistics:
    """Distribution statistics that TRL's fused head computes from its own projected tiles, for one forward.

    Set (through `_TILE_STATISTICS`) while the policy's fused forward runs; `_LogProbWithStatistics` fills `values`,
    one entry per row it projects. Left unfilled (`done` False) when the call does not match the expected rows, and
    the forward then falls back to the separate chunked pass.
    """

    statistics: dict[str, DistributionStatistic]
    kwargs: dict[str, dict[str, Any]]
    mask: torch.Tensor  # (B, T-1): the supervised positions of the call
    chunk_elements: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N,) per projected row
    rows: torch.Tensor | None = None  # (N,) bool: the projected rows that are supervised (None: all of them)
    done: bool = False

    def per_position(self) -> dict[str, torch.Tensor]:
        """The statistics as `(B, T-1)` float32, 0 at positions that are not supervised."""
        out = {}
        for name, value in self.values.items():
            mask = self.mask.to(value.device)
            if value.numel() == mask.numel():  # every position was projected (TRL's layout off Triton)
                out[name] = torch.where(mask, value.view(mask.shape), 0.0)
            else:  # only the supervised positions, in order
                full = torch.zeros(mask.shape, dtype=torch.float32, device=value.device)
                full[mask] = value
                out[name] = full
        return out


_TILE_STATISTICS: ContextVar[_TileStatistics | None] = ContextVar("trl_priority_tile_statistics", default=None)


class _LogProbWithStatistics(_trl_kernel.ChunkedLogProbFunction):
    """TRL's `ChunkedLogProbFunction` whose forward also yields distribution statistics from the tiles it projects.

    The forward projects `n` rows at a time over the whole vocabulary, accumulating in float32 (the products in the
    compute dtype: `_Head.logits_fp32`), and then:

    - folds the tile into TRL's online log-sum-exp with TRL's own fold (`_forward_kernel` on Triton devices,
      `_forward_tile` elsewhere), vocabulary chunk by vocabulary chunk as TRL does, on the tile as TRL computes it
      (the float32 product rounded to the compute dtype, bias added in it), so `log_probs`, `entropy`, `is_top1`,
      ... are TRL's;
    - computes each requested statistic from the float32 log-softmax of the same tile (supervised rows only).

    The backward is TRL's, unchanged (inherited), from the same saved tensors, so gradients are TRL's. Without an
    active `_TileStatistics`, or at a temperature other than 1 (the statistics are the model's own distribution), the
    forward is TRL's own.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=_trl_kernel.OPTIONAL_OUTPUTS,
    ):
        job = _TILE_STATISTICS.get()
        num_rows = hidden.shape[0]
        layouts = (job.mask.numel(), int(job.mask.sum())) if job is not None else ()
        if job is None or temperature != 1.0 or num_rows not in layouts:
            return _trl_kernel.ChunkedLogProbFunction.forward(
                ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
                outputs,
            )  # fmt: skip
        # As TRL's forward, up to the projection
        ctx.set_materialize_grads(False)
        device, vocab = hidden.device, weight.shape[0]
        autocast = torch.is_autocast_enabled(device.type)
        compute_dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        kernel_args = {
            "logit_scale": logit_scale,
            "softcap": final_logit_softcapping or 1.0,
            "inv_t": 1 / temperature,
            "HAS_SOFTCAP": final_logit_softcapping is not None,
        }
        output_flags = {f"HAS_{name.upper()}": name in outputs for name in _trl_kernel.OPTIONAL_OUTPUTS}
        zeros = functools.partial(torch.zeros, (num_rows,), device=device, dtype=torch.float32)
        running_max, max_before_target = zeros().fill_(-torch.inf), zeros().fill_(-torch.inf)
        sum_exp, x_sum_exp, sq_sum_exp, z_sum, target_logit = zeros(), zeros(), zeros(), zeros(), zeros()

        # Which projected rows are supervised: all of them (Triton devices score only those), or `mask` flattened
        supervised = None if num_rows != job.mask.numel() or num_rows == layouts[1] else job.mask.reshape(-1)
        job.values = {name: zeros() for name in job.statistics}
        head = _Head(weight.detach().to(compute_dtype), None, logit_scale, final_logit_softcapping)  # cast once
        tile_bias = bias.detach().to(compute_dtype) if bias is not None else None
        triton = _trl_kernel._use_triton(device)
        step = max(1, min(_trl_kernel.TOKEN_CHUNK_SIZE, job.chunk_elements // vocab))
        with torch.no_grad():
            for start in range(0, num_rows, step):
                rows = slice(start, min(start + step, num_rows))
                n = rows.stop - start
                logits = head.logits_fp32(hidden[rows].detach(), compute_dtype)  # (n, V) float32, no bias yet
                # TRL's tile: its GEMM's output in the compute dtype (a float32 accumulation, rounded), plus the bias
                tile = logits if compute_dtype == torch.float32 else logits.to(compute_dtype)  # (n, V)
                if tile_bias is not None:
                    tile = tile + tile_bias
                    logits = logits + bias.detach().float()
                for v_start in range(0, vocab, chunk_size):
                    width = min(chunk_size, vocab - v_start)
                    columns = tile[:, v_start : v_start + width]
                    fold = _trl_kernel._forward_kernel[(n,)] if triton else _trl_kernel._forward_tile
                    fold(
                        columns, tile.stride(0), targets[rows], running_max[rows], sum_exp[rows], x_sum_exp[rows],
                        sq_sum_exp[rows], z_sum[rows], max_before_target[rows], target_logit[rows], v_start, width,
                        BLOCK_SIZE=_trl_kernel._BLOCK_SIZE, **output_flags, **kernel_args,
                    )  # fmt: skip
                del tile
                keep = None if supervised is None else supervised[rows].nonzero().squeeze(1)  # (n',)
                if keep is not None and keep.numel() == 0:
                    continue
                if keep is not None and keep.numel() < n:
                    logits = logits.index_select(0, keep)
                logprobs = head.transform(logits)  # (n', V) float32: logits, made log-probabilities if needed
                if not all(stat.shift_invariant for stat in job.statistics.values()):
                    logprobs = logprobs.log_softmax(-1)
                labels = targets[rows] if keep is None else targets[rows].index_select(0, keep)
                for name, stat in job.statistics.items():
                    value = stat.fn(logprobs, labels, **job.kwargs[name])  # (n',)
                    if keep is None:
                        job.values[name][rows] = value
                    else:
                        job.values[name][rows].index_copy_(0, keep, value.float())
        job.done = True

        # As TRL's forward, from the folded statistics on
        log_z = running_max + torch.log(sum_exp)
        logprobs = target_logit - log_z
        entropy = log_z - x_sum_exp / sum_exp if "entropy" in outputs else None
        log_sum_sq_probs = torch.log(sq_sum_exp) - 2 * torch.log(sum_exp) if "log_sum_sq_probs" in outputs else None
        mean_logits = z_sum / vocab if "mean_logits" in outputs else None
        is_top1 = (target_logit >= running_max) & (target_logit > max_before_target) if "is_top1" in outputs else None
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = chunk_size
        ctx.kernel_args = kernel_args
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq_probs, mean_logits, is_top1) if x is not None))
        return logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1


def _tile_statistics_for(request: DistributionRequest, labels: torch.Tensor | None) -> _TileStatistics | None:
    """The policy's statistics of `request` as a job for the fused head's tiles; None when the chunked pass must run
    anyway (distribution terms need the policy's logits with their own gradient, a reference's distribution is
    projected there) or there is nothing to compute."""
    if not request.statistics or request.terms or request.reference is not None or labels is None:
        return None
    stats = {name: DISTRIBUTION_STATISTICS.get(name) or _FUSED_FROM_CHUNK[name] for name in request.statistics}
    return _TileStatistics(
        statistics=stats,
        kwargs={name: {hp: request.args[hp] for hp in stat.hyperparameters} for name, stat in stats.items()},
        mask=labels[:, 1:] != -100,
        chunk_elements=chunk_elements_for(labels.device, request.chunk_elements),
    )


@contextmanager
def _statistics_in_fused_head(job: _TileStatistics | None):
    """While the block runs, TRL's fused head (`add_fused_lm_head`, which looks its kernel up in `trl.trainer.utils`
    at call time) computes `job`'s statistics from its own tiles."""
    if job is None:
        yield
        return
    token = _TILE_STATISTICS.set(job)  # per thread: another thread's call finds no job and runs TRL's forward
    _trl_utils._ChunkedLogProbFunction = _LogProbWithStatistics
    try:
        yield
    finally:
        # TRL's own class, not the value found on entry: concurrent calls (DataParallel threads) cannot leave it patched
        _trl_utils._ChunkedLogProbFunction = _trl_kernel.ChunkedLogProbFunction
        _TILE_STATISTICS.reset(token)


def add_distribution_head(causal_lm) -> None:
    """Let `causal_lm`'s forward serve a `DistributionRequest`, after TRL's `add_fused_lm_head` patched it.

    `model(**inputs, fused_lm_head=True, distribution_request=request)` then also computes the request's statistics
    and terms from the final hidden states, inside the model's own forward: the place where DeepSpeed ZeRO-3 and FSDP
    have the parameters gathered and accelerate's autocast is active, as for TRL's fused head. With
    `request.backbone_only` the fused head is skipped (a reference needs no loss). Idempotent.
    """
    if getattr(causal_lm, "_trl_priority_distribution_head", False):
        return
    fused_forward = causal_lm.forward

    @functools.wraps(fused_forward)
    def forward(self, *args, distribution_request: _Untouched | DistributionRequest | None = None, **kwargs):
        if distribution_request is None:
            return fused_forward(*args, **kwargs)
        request = getattr(distribution_request, "request", distribution_request)
        labels = kwargs.get("labels")
        virtual = virtual_positions(labels, request.label_length)
        real_labels = labels if labels is None else labels[:, virtual:]  # (B, T)
        if request.backbone_only:
            backbone_kwargs = {
                k: v for k, v in kwargs.items() if k not in ("labels", "fused_lm_head", "num_items_in_batch")
            }
            backbone_kwargs["use_cache"] = False
            hidden = self.base_model(*args, **backbone_kwargs).last_hidden_state[:, virtual:]  # (B, T, H)
            request.hidden = hidden
            if request.statistics or request.terms:
                _distribution_pass(hidden, real_labels, self, request)
            return None
        if request.before_terms is not None and request.terms:
            return _statistics_then_terms(self, fused_forward, args, kwargs, request)
        job = _tile_statistics_for(request, labels)
        outputs, hidden = _fused_forward_keeping_hidden(self, fused_forward, args, kwargs, job, request.label_length)
        if job is not None and job.done:
            request.values.update(_real_positions(job.per_position(), virtual))
        else:  # terms, a reference's distribution, or a call the fused head did not serve: the chunked pass
            _distribution_pass(hidden, real_labels, self, request)
        return outputs

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._trl_priority_distribution_head = True


def virtual_positions(labels: torch.Tensor | None, label_length: int | None) -> int:
    """How many positions a PEFT prompt-learning adapter prepended to a sequence whose caller's labels are
    `label_length` long: the virtual tokens of prompt tuning and p-tuning (`PeftModelForCausalLM.forward` prepends
    their embeddings and `num_virtual_tokens` labels -100). Prefix tuning adds keys and values, not positions: 0."""
    if labels is None or label_length is None:
        return 0
    return max(0, labels.shape[1] - label_length)


def _real_positions(values: Mapping[str, torch.Tensor], virtual: int) -> dict[str, torch.Tensor]:
    """Per-position `(B, V + T - 1)` statistics without the first `virtual` positions: `(B, T - 1)`."""
    return {name: value[:, virtual:] for name, value in values.items()}


def drop_virtual_positions(outputs, label_length: int | None):
    """TRL's fused-head `outputs` on the caller's positions only: `(B, T_virtual + T - 1)` per-token fields cut to
    the last `T - 1`, so that position t scores `labels[:, t + 1]` of the caller's labels, as everywhere here.
    Idempotent; `outputs.loss` is left as computed.

    PEFT's own loss gives the virtual positions label -100; the one real label they score, the sequence's first
    token predicted from the last virtual token, has no place in this layout (nothing else scores `labels[:, 0]`),
    so a priority neither weights nor trains it.
    """
    if outputs is None or label_length is None:
        return outputs
    length = label_length - 1
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] > length:
            outputs[name] = value[:, value.shape[1] - length :]
    return outputs


def _fused_forward_keeping_hidden(
    causal_lm, fused_forward, args, kwargs, job: _TileStatistics | None, label_length: int | None = None
):
    """TRL's fused forward (with `job`'s statistics from its tiles), and the final hidden states it projected, both
    on the caller's `label_length` positions (PEFT's prompt tuning prepends virtual ones)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, hook_args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = causal_lm.base_model.register_forward_hook(hook)
    try:
        with _statistics_in_fused_head(job):
            outputs = fused_forward(*args, **kwargs)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    virtual = virtual_positions(kwargs.get("labels"), label_length)
    return drop_virtual_positions(outputs, label_length), hidden[:, virtual:]  # (B, T, H)


def _statistics_then_terms(causal_lm, fused_forward, args, kwargs, request: DistributionRequest):
    """Serve a request whose terms read what this forward computes (Φ, `logps`, a distribution statistic), in order:

    1. the fused head, with the policy's distribution statistics from its tiles (or, when the reference's statistics
       come from its distribution, a chunked pass without gradient that projects both heads);
    2. `request.before_terms(outputs, request)`: the trainer computes Φ from every statistic and hands the terms
       their inputs (and, for the unlikelihood of a signed method, the positions to project: those with Φ < 0);
    3. the terms, with gradient, in a second chunked pass at those positions.

    Still inside the model's forward, so the LM head is gathered (ZeRO-3, FSDP) and autocast active, as for the
    one-pass case. The price: the policy's LM head runs once more over the projected positions (every supervised
    one for a term over all tokens; only the negatives for a signed method's unlikelihood), and, when the reference's
    statistics come from its distribution, the reference's head once more as well.
    """
    labels = kwargs.get("labels")
    virtual = virtual_positions(labels, request.label_length)
    real_labels = labels if labels is None else labels[:, virtual:]  # (B, T): the caller's positions
    reference = request.reference
    reference_in_pass = reference is not None and bool(reference.statistics)
    first = DistributionRequest(
        statistics=request.statistics,
        args=request.args,
        reference=reference if reference_in_pass else None,
        chunk_elements=request.chunk_elements,
    )
    job = _tile_statistics_for(first, labels)
    outputs, hidden = _fused_forward_keeping_hidden(causal_lm, fused_forward, args, kwargs, job, request.label_length)
    if job is not None and job.done:
        request.values.update(_real_positions(job.per_position(), virtual))
    elif first.statistics or reference_in_pass:
        with torch.no_grad():
            _distribution_pass(hidden, real_labels, causal_lm, first)
        request.values.update(first.values)
    request.before_terms(outputs, request)
    second = dataclasses.replace(
        request,
        statistics=(),
        reference=None if reference is None else dataclasses.replace(reference, statistics=()),
        values={},
        term_values={},
        term_total=None,
        before_terms=None,
    )
    _distribution_pass(hidden, real_labels, causal_lm, second)
    request.term_values, request.term_total = second.term_values, second.term_total
    return outputs


def fused_statistics(outputs, names: Iterable[str], causal_lm) -> dict[str, torch.Tensor]:
    """The statistics among `names` that TRL's fused head returns (`logps`, `entropy`), detached, float32."""
    statistics = {}
    for name in names:
        if name in FUSED_STATISTICS:
            value = getattr(outputs, FUSED_STATISTICS[name])
            if value is None:
                raise RuntimeError(
                    f"The fused LM head of {type(causal_lm).__name__} does not compute '{FUSED_STATISTICS[name]}'."
                )
            statistics[name] = value.detach().float()
    return statistics


def forward_statistics(
    model,
    inputs: Mapping[str, Any],
    names: Iterable[str],
    args: Mapping[str, Any],
    keep_outputs: bool = True,
    request: DistributionRequest | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run `model` with TRL's fused LM head and return `(outputs, statistics)`.

    `names` are policy statistics (no prefix) wanted from this model; `outputs` keeps the gradient of `log_probs`
    for the loss, while every returned statistic is detached. Used for the policy and for model references alike; the
    model's causal LM must carry `add_distribution_head`.

    With `keep_outputs=False` (a reference, which needs no loss) and a distribution statistic among `names`, the
    backbone runs alone and one chunked projection serves every statistic. `outputs` is then None.
    `request` may carry distribution terms (with gradient); its statistics are filled in here.
    """
    names = list(dict.fromkeys(names))
    distribution = [name for name in names if name in DISTRIBUTION_STATISTICS]
    request = request or DistributionRequest(args=args)
    request.label_length = inputs["labels"].shape[1]
    causal_lm = causal_lm_of(model)
    if not getattr(causal_lm, "_trl_priority_distribution_head", False):
        add_distribution_head(causal_lm)
    if not keep_outputs and (distribution or request.backbone_only):
        request.statistics = tuple(names)
        request.backbone_only = True
        model(**inputs, fused_lm_head=True, distribution_request=_Untouched(request))
        return None, dict(request.values)
    request.statistics = tuple(distribution)
    needs_pass = bool(distribution or request.terms)
    attention = [name for name in names if name in ATTENTION_STATISTICS]
    num_layers = max((int(args[ATTENTION_STATISTICS[n].layers_hyperparameter]) for n in attention), default=0)
    passed = {"distribution_request": _Untouched(request)} if needs_pass else {}
    with captured_attention(causal_lm, num_layers) if attention else nullcontext([]) as weights:
        outputs = model(**inputs, fused_lm_head=True, **passed)
    outputs = drop_virtual_positions(outputs, request.label_length)  # PEFT prompt tuning prepends positions
    statistics = fused_statistics(outputs, names, causal_lm)
    for name in attention:
        layers = int(args[ATTENTION_STATISTICS[name].layers_hyperparameter])
        statistics[name] = ATTENTION_STATISTICS[name].fn(weights[-layers:], inputs, causal_lm.config)
    statistics.update(request.values)
    return outputs, statistics


def distribution_statistics(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    causal_lm,
    names: Iterable[str],
    args: Mapping[str, Any],
    chunk_elements: int | None = None,
) -> dict[str, torch.Tensor]:
    """Distribution statistics of final hidden states `(B, T, H)` at the supervised positions, chunk by chunk.

    The functional core of the forward's pass, for tests and tools; training computes the same inside the forward.
    """
    request = DistributionRequest(statistics=tuple(names), args=args, chunk_elements=chunk_elements)
    with torch.no_grad():
        _distribution_pass(hidden, labels, causal_lm, request)
    return request.values
