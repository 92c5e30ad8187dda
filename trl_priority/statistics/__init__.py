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

`logps` and `entropy` come from TRL's public fused LM head (`fused_lm_head=True`), which never builds the
`(batch, seq, vocab)` logits. The *distribution* statistics (`mass`, `topk_entropy`, a reference's from its
distribution) and the differentiable *distribution terms* of a method's objective
(`trl_priority.objectives.DistributionTerm`: a KL anchor, a soft-target cross-entropy) need the whole next-token
distribution: a method that reads one is served by the package's own chunked LM-head pass instead
(`trl_priority.statistics.lm_head`, through `serve_request`), which also gives it `logps`, `entropy` and the Φ-weighted NLL with
its gradient, from the final hidden states a forward hook on the backbone hands over, a few hundred supervised
positions at a time, so memory grows with `chunk × vocab`, never `batch × seq × vocab`.

Adding a distribution statistic is one function registered in `DISTRIBUTION_STATISTICS`; adding a data statistic is
one `register_data_statistic` call (the column is then carried through truncation, padding, padding-free and packing
by `trl_priority.data.columns`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trl_priority.signatures import hyperparameter_names
from trl_priority.statistics import lm_head  # noqa: F401  (the pass, read as `statistics.lm_head`)
from trl_priority.statistics.lm_head import gathered_head, logit_transform  # noqa: F401  (re-exported)


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
    one constant per row)."""

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


# The LM head and its chunked pass live in `trl_priority.statistics.lm_head`; the logit transform keeps its old name here
_logit_transform = logit_transform


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


# The forward that computes the policy statistics, re-exported here (it reads the vocabulary above)
from trl_priority.statistics.forward import (  # noqa: E402, F401
    DistributionRequest,
    LMHeadOutput,
    ReferenceDistribution,
    chunk_statistics,
    distribution_statistics,
    drop_virtual_positions,
    forward_statistics,
    fused_statistics,
    on_final_hidden,
    serve_request,
    virtual_positions,
)
