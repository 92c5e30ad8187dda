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
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from trl_priority.signatures import hyperparameter_names
from trl_priority.statistics import lm_head
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


# ------------------------------------------------------------------------------------------------------------------
# The request a forward carries, and the package's own LM-head pass that serves it (`trl_priority.statistics.lm_head`)
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceDistribution:
    """The reference's final hidden states and the model whose LM head projects them, for the LM-head pass.

    `statistics` are reference statistics (no `ref_` prefix) to compute from its distribution in the policy's pass,
    before Φ; a distribution term that reads `ref_logprobs` projects its head again, once, in the objective.
    """

    hidden: torch.Tensor  # (B, T, H_ref), no gradient
    causal_lm: torch.nn.Module
    statistics: tuple[str, ...] = ()


@dataclass
class DistributionRequest:
    """What a policy forward computes besides TRL's fused log-probabilities; the pass writes its results here.

    A request with distribution statistics, a reference's distribution or terms is served by the package's LM-head
    pass (`trl_priority.statistics.lm_head`) from the final hidden states, inside the model's forward (a forward hook on its
    backbone hands them over), instead of TRL's fused head. The results come back in the request itself.
    """

    statistics: tuple[str, ...] = ()  # no-gradient distribution statistics (and `logps` / `entropy` for a reference)
    args: Mapping[str, Any] = field(default_factory=dict)
    terms: tuple[Any, ...] = ()  # `DistributionTerm`s: differentiable, summed over the supervised positions
    term_weights: tuple[float, ...] = ()
    term_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)  # (B, T-1) per-token inputs of the terms
    reference: ReferenceDistribution | Any | None = None  # or a `TopKReferenceDistribution`
    backbone_only: bool = False  # a reference: its final hidden states only (`hidden`), no head
    # Called in the pass once the statistics are known, before the objective: `before_terms(outputs, request)`
    # computes Φ and sets `nll_weight` (B, T-1) and `term_inputs`. Without it the pass computes statistics only.
    before_terms: Callable[[Any, DistributionRequest], None] | None = None
    nll_weight: torch.Tensor | None = None  # (B, T-1): w_t of Σ_t w_t·(−log π(y_t)), no gradient
    chunk_elements: int | None = None  # positions × vocabulary per chunk; None: `chunk_elements_for`, at call time
    label_length: int | None = None  # the caller's T: a longer forward has PEFT's virtual tokens first
    # Results
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # statistic -> (B, T-1), no gradient
    term_values: dict[str, torch.Tensor] = field(default_factory=dict)  # term -> (B, T-1) per token, no gradient
    objective: torch.Tensor | None = None  # Σ_t w_t·(−log π(y_t)) + Σ_terms λ·Σ_t term_t, with gradient
    hidden: torch.Tensor | None = None  # the final hidden states, when `backbone_only`

    @property
    def needs_pass(self) -> bool:
        """Whether the package's LM-head pass serves this request (else TRL's fused head does)."""
        reference_statistics = getattr(self.reference, "statistics", ()) if self.reference is not None else ()
        return bool(self.statistics or self.terms or reference_statistics)


@dataclass
class LMHeadOutput:
    """The per-token fields of TRL's `FusedCausalLMOutput` the trainer reads, from the package's LM-head pass:
    `(B, T-1)` each, no gradient (the loss is the request's `objective`)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    label_mask: torch.Tensor
    aux_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def virtual_positions(labels: torch.Tensor | None, label_length: int | None) -> int:
    """How many positions a PEFT prompt-learning adapter prepended to a sequence whose caller's labels are
    `label_length` long: the virtual tokens of prompt tuning and p-tuning (`PeftModelForCausalLM.forward` prepends
    their embeddings and `num_virtual_tokens` labels -100). Prefix tuning adds keys and values, not positions: 0."""
    if labels is None or label_length is None:
        return 0
    return max(0, labels.shape[1] - label_length)


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


def _positions(rows_value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(N,)` values of the supervised rows back at their positions: `(B, T-1)` float32, 0 elsewhere."""
    full = torch.zeros(mask.shape, dtype=torch.float32, device=rows_value.device)
    full[mask] = rows_value.float()
    return full


def chunk_statistics(names: Iterable[str], args: Mapping[str, Any]) -> dict[str, lm_head.ChunkStatistic]:
    """The statistics `names` as functions of a chunk, their hyperparameters bound from `args`."""
    out = {}
    for name in names:
        if name in DISTRIBUTION_STATISTICS:
            stat = DISTRIBUTION_STATISTICS[name]
            out[name] = functools.partial(stat.fn, **{hp: args[hp] for hp in stat.hyperparameters})
        else:
            out[name] = lm_head.FUSED_FROM_CHUNK[name]
    return out


def _reference_rows(reference, mask: torch.Tensor, stack: ExitStack) -> lm_head.ReferenceRows | None:
    """The request's reference at the supervised rows (a model's head gathered on `stack`), or None."""
    if reference is None:
        return None
    if isinstance(reference, ReferenceDistribution):
        head = stack.enter_context(lm_head.gathered_head(reference.causal_lm))
        rows_hidden = reference.hidden[:, :-1][mask.to(reference.hidden.device)].to(mask.device)  # (N, H_ref)
        return lm_head.ReferenceRows(head=head, hidden=rows_hidden)
    return lm_head.ReferenceRows(topk=reference.rows(mask))  # a cached top-k (`topk_reference`)


def serve_request(hidden: torch.Tensor, labels: torch.Tensor, causal_lm, request: DistributionRequest):
    """Serve `request` from the final hidden states `(B, T, H)` and the caller's labels `(B, T)` with the package's
    LM-head pass; return the `LMHeadOutput` (policy statistics TRL's fused head would give).

    1. `lm_head.statistics_pass`, no gradient: `logps`, `entropy`, `is_top1`, the request's distribution statistics,
       and the reference's statistics from its distribution;
    2. `request.before_terms(outputs, request)`: Φ, from all of them (the trainer's);
    3. `lm_head.objective_pass`: the Φ-weighted NLL and the terms, with gradient (`request.objective`).
    Steps 2 and 3 only when `before_terms` is set (a training or evaluation loss).
    """
    shifted = labels[:, 1:].to(hidden.device)  # (B, T-1)
    mask = shifted != -100  # (B, T-1)
    rows_hidden = hidden[:, :-1][mask]  # (N, H): only supervised positions are projected
    rows_labels = shifted[mask]  # (N,)
    args = request.args
    policy_names = ("logps", "entropy", "is_top1", *(n for n in request.statistics if n not in FUSED_STATISTICS))
    ref_names = tuple(getattr(request.reference, "statistics", ()) or ())
    with ExitStack() as stack:
        head = stack.enter_context(lm_head.gathered_head(causal_lm))
        reference = _reference_rows(request.reference, mask, stack)
        chunk_rows = max(1, chunk_elements_for(hidden.device, request.chunk_elements) // head.vocab_size)
        values = lm_head.statistics_pass(
            rows_hidden,
            rows_labels,
            head,
            chunk_statistics(policy_names, args),
            chunk_rows,
            reference=reference if ref_names else None,
            ref_statistics=chunk_statistics(ref_names, args),
        )
        full = {name: _positions(value, mask) for name, value in values.items()}
        outputs = LMHeadOutput(full["logps"], full["entropy"], full["is_top1"].bool(), mask)
        request.values.update(
            {name: full[name] for name in request.statistics},
            **{f"ref_{name}": full[f"ref_{name}"] for name in ref_names},
        )
        if request.before_terms is None:
            return outputs
        request.before_terms(outputs, request)
        term_rows = {name: value.to(hidden.device)[mask] for name, value in request.term_inputs.items()}  # (N,)
        term_rows.update({f"ref_{name}": values[f"ref_{name}"] for name in ref_names})
        terms = [
            lm_head.ChunkTerm(
                term.name,
                weight,
                functools.partial(_call_term, term, rows=term_rows, args=args),
            )
            for term, weight in zip(request.terms, request.term_weights)
        ]
        reads_reference = any(getattr(term, "needs_reference_distribution", False) for term in request.terms)
        nll_weight = (
            torch.zeros(mask.shape, device=hidden.device) if request.nll_weight is None else request.nll_weight
        )
        request.objective, term_values = lm_head.objective_pass(
            rows_hidden,
            rows_labels,
            head,
            nll_weight.to(hidden.device)[mask],
            terms,
            chunk_rows,
            reference=reference if reads_reference else None,
        )
        request.term_values = {name: _positions(value, mask) for name, value in term_values.items()}
    return outputs


def _call_term(term, logprobs, labels, ref_logprobs, chunk, *, rows, args):
    """A `DistributionTerm` called on a chunk, its per-token inputs cut from `rows` `(N,)`."""
    return term(logprobs, labels, ref_logprobs, rows, chunk, args)


@contextmanager
def on_final_hidden(causal_lm, label_length: int, fn: Callable[[torch.Tensor], None]):
    """While the block runs, every forward of `causal_lm`'s backbone hands its final hidden states on the caller's
    `label_length` positions (PEFT's virtual tokens cut off) `(B, T, H)` to `fn`, inside the model's forward: where
    ZeRO-3 and FSDP expect the LM head to be used and accelerate's autocast is active. A public forward hook; the
    model's `forward` and TRL's classes are left as they are."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        fn(hidden[:, hidden.shape[1] - label_length :])

    handle = causal_lm.base_model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _forward_for_hidden(model, inputs: Mapping[str, Any]):
    """The model's own forward, its LM head limited to one position per sequence (`logits_to_keep=1`): the pass
    projects the hidden states itself. No labels, so no loss over logits that are not there."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    kwargs["use_cache"] = False
    return model(**kwargs, logits_to_keep=1)


def forward_statistics(
    model,
    inputs: Mapping[str, Any],
    names: Iterable[str],
    args: Mapping[str, Any],
    keep_outputs: bool = True,
    request: DistributionRequest | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run `model` and return `(outputs, statistics)`.

    `names` are policy statistics (no prefix) wanted from this model; every returned statistic is detached. Used for
    the policy and for model references alike.

    - Without a distribution statistic, terms or a reference's distribution: TRL's public fused head
      (`fused_lm_head=True`, `add_fused_lm_head`), unchanged; `outputs` keeps the gradient of `log_probs`.
    - Otherwise the package's LM-head pass (`serve_request`): `outputs` is an `LMHeadOutput` without gradient, and
      with `request.before_terms` set, the loss (Φ-weighted NLL and terms, with gradient) is `request.objective`.
    - With `keep_outputs=False` (a reference, which needs no loss) and a distribution statistic among `names` (or
      `request.backbone_only`), the backbone's hidden states alone are kept and one pass serves every statistic
      (or they are returned in `request.hidden`). `outputs` is then None.
    """
    names = list(dict.fromkeys(names))
    distribution = [name for name in names if name in DISTRIBUTION_STATISTICS]
    request = request or DistributionRequest(args=args)
    label_length = request.label_length = inputs["labels"].shape[1]
    causal_lm = causal_lm_of(model)
    if not keep_outputs and (distribution or request.backbone_only):
        request.statistics = tuple(names)
        served: dict[str, Any] = {}

        def reference_pass(hidden):
            if request.backbone_only:
                request.hidden = hidden
            else:
                served["outputs"] = serve_request(hidden, inputs["labels"], causal_lm, request)

        with on_final_hidden(causal_lm, label_length, reference_pass):
            _forward_for_hidden(model, inputs)
        return None, {name: request.values[name] for name in names if name in request.values} | (
            {name: getattr(served["outputs"], FUSED_STATISTICS[name]) for name in names if name in FUSED_STATISTICS}
            if "outputs" in served
            else {}
        )
    request.statistics = tuple(distribution)
    attention = [name for name in names if name in ATTENTION_STATISTICS]
    num_layers = max((int(args[ATTENTION_STATISTICS[n].layers_hyperparameter]) for n in attention), default=0)
    with captured_attention(causal_lm, num_layers) if attention else nullcontext([]) as weights:
        if request.needs_pass:
            served = {}

            def policy_pass(hidden):
                served["outputs"] = serve_request(hidden, inputs["labels"], causal_lm, request)

            with on_final_hidden(causal_lm, label_length, policy_pass):
                model_outputs = _forward_for_hidden(model, inputs)
            outputs = served["outputs"]
            outputs.aux_loss = getattr(model_outputs, "aux_loss", None)
            # The model's own head (one position per row) joins the loss at weight 0, so that its backward runs: under
            # DeepSpeed ZeRO-3 that is when the head's weight is gathered, and autograd accumulates the pass's weight
            # gradient into the weight as it then is (partitioned, 0 elements, it fails: "size of tensor a (0) must
            # match ... (32)"; found by tests/test_distributed.py's zero3 asft run)
            logits = getattr(model_outputs, "logits", None)
            if request.objective is not None and logits is not None and logits.requires_grad:
                request.objective = request.objective + 0.0 * logits.sum()
        else:
            outputs = drop_virtual_positions(model(**inputs, fused_lm_head=True), label_length)
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
    """Distribution statistics (`logps` and `entropy` too) of final hidden states `(B, T, H)` at the supervised
    positions, chunk by chunk, `(B, T-1)` each. The functional core of the pass, for tests and tools."""
    request = DistributionRequest(statistics=tuple(names), args=args, chunk_elements=chunk_elements)
    with torch.no_grad():
        outputs = serve_request(hidden, labels, causal_lm, request)
    fused = {name: getattr(outputs, FUSED_STATISTICS[name]) for name in names if name in FUSED_STATISTICS}
    return {**request.values, **fused}
