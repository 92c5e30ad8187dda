"""The per-token statistics a priority may read, and how they are computed.

Every statistic is a tensor of shape `(batch, seq_len - 1)` aligned like TRL's fused-head `log_probs`: position t
scores the label `labels[:, t + 1]`. Priorities name the statistics they need as positional parameters:

| name              | source    | meaning                                                                          |
|-------------------|-----------|----------------------------------------------------------------------------------|
| `mask`            | labels    | the label is supervised (not -100)                                               |
| `logps`           | policy    | log π_θ(y_t), from TRL's fused LM head, no gradient                              |
| `entropy`         | policy    | entropy of π_θ(· given y_<t), fused head                                         |
| `mass`            | policy    | Σ_v π(v)·1[π(v) < π(y_t)] + π(y_t): probability mass at or below the label       |
| `topk_entropy`    | policy    | entropy of the top-k renormalised next-token distribution (hyperparameter `k`)   |
| `ref_<name>`      | reference | any policy statistic above, under the frozen reference                           |
| `response_mask`   | data      | the token belongs to the response (completion), not the prompt                   |

`logps` and `entropy` come from TRL's fused LM head, which never builds the `(batch, seq, vocab)` logits. The
*distribution* statistics (`mass`, `topk_entropy`) need the whole next-token distribution: they are computed
from the final hidden states, projected through the LM head a few hundred positions at a time, and only for the
supervised positions, so memory grows with `chunk × vocab`, never `batch × seq × vocab`.

Adding a distribution statistic is one function registered in `DISTRIBUTION_STATISTICS`; adding a data column
statistic is one entry in `DATA_STATISTICS` (the column is then carried through padding, padding-free and packing by
`trl_priority.data`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch


# ------------------------------------------------------------------------------------------------------------------
# Distribution statistics: pure functions of a chunk of next-token log-probabilities.
#   logprobs: (n, V) float32, log-softmax of the next-token logits at n supervised positions
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
    fn: Callable[..., torch.Tensor]

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)


DISTRIBUTION_STATISTICS: dict[str, DistributionStatistic] = {
    "mass": DistributionStatistic(mass),
    "topk_entropy": DistributionStatistic(topk_entropy),
}

# Statistic name -> field of TRL's `FusedCausalLMOutput`
FUSED_STATISTICS = {"logps": "log_probs", "entropy": "entropy"}


@dataclass(frozen=True)
class DataStatistic:
    """A per-token column of the prepared dataset, shifted to score labels like `logps`."""

    column: str
    hint: str  # how a dataset gets this column, shown when it is missing


DATA_STATISTICS: dict[str, DataStatistic] = {
    "response_mask": DataStatistic(
        column="completion_mask",
        hint="TRL builds it from prompt-completion datasets (columns 'prompt' and 'completion', standard or "
        "conversational), or give a tokenized dataset a 'completion_mask' column (1 on response tokens)",
    ),
}

POLICY_STATISTICS = (*FUSED_STATISTICS, *DISTRIBUTION_STATISTICS)

# The fused statistics computed from a chunk instead, when the chunks are projected anyway (see `forward_statistics`)
_FUSED_FROM_CHUNK = {
    "logps": DistributionStatistic(lambda logprobs, labels: logprobs.gather(1, labels[:, None]).squeeze(1)),
    "entropy": DistributionStatistic(lambda logprobs, labels: -(logprobs.exp() * logprobs).sum(-1)),
}


def source_of(name: str) -> str | None:
    """'labels', 'policy', 'reference' or 'data'; None for a name that is no statistic."""
    if name == "mask":
        return "labels"
    if name in POLICY_STATISTICS:
        return "policy"
    if name.startswith("ref_") and name[4:] in POLICY_STATISTICS:
        return "reference"
    if name in DATA_STATISTICS:
        return "data"
    return None


def known_statistics() -> list[str]:
    return ["mask", *POLICY_STATISTICS, *(f"ref_{name}" for name in POLICY_STATISTICS), *DATA_STATISTICS]


def hyperparameters_of(name: str) -> tuple[str, ...]:
    """Hyperparameters of the priority that a statistic is computed with (e.g. `k` for `topk_entropy`)."""
    base = name[4:] if name.startswith("ref_") else name
    return DISTRIBUTION_STATISTICS[base].hyperparameters if base in DISTRIBUTION_STATISTICS else ()


# ------------------------------------------------------------------------------------------------------------------
# Computing them
# ------------------------------------------------------------------------------------------------------------------
# Positions × vocabulary entries per LM-head chunk: 2^24 float32 logits = 64 MiB, e.g. 341 positions of a 49k vocab.
CHUNK_ELEMENTS = 2**24


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


def next_token_logprobs(
    hidden: torch.Tensor, causal_lm, chunk_rows: int | None = None
) -> Iterable[tuple[slice, torch.Tensor]]:
    """Yield `(rows, logprobs)` over chunks of positions: `logprobs` is `(n, V)` float32 for `hidden[rows]`.

    `hidden` is `(N, H)`: final hidden states at N positions. No gradient flows.
    """
    lm_head = causal_lm.get_output_embeddings()
    scale, softcap = _logit_transform(causal_lm.config)
    vocab = lm_head.weight.shape[0]
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, hidden.size(0), chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = lm_head(hidden[rows].to(lm_head.weight.dtype)).float() * scale  # (n, V)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        yield rows, logits.log_softmax(-1)


@torch.no_grad()
def distribution_statistics(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    causal_lm,
    names: Iterable[str],
    args: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Compute distribution statistics at the supervised positions, chunk by chunk.

    Args:
        hidden: `(B, T, H)` final hidden states of the backbone.
        labels: `(B, T)` labels, -100 where ignored.
        causal_lm: the model whose LM head projects `hidden` (unwrapped from PEFT / DDP).
        names: distribution statistics to compute (no `ref_` prefix); `logps` and `entropy` are accepted too.
        args: the priority's resolved hyperparameters; each statistic takes the ones it declares.
    """
    names = list(names)
    shifted = labels[:, 1:]  # (B, T-1)
    mask = shifted != -100  # (B, T-1)
    rows_hidden = hidden[:, :-1][mask]  # (N, H): only supervised positions are projected
    rows_labels = shifted[mask]  # (N,)
    values = {name: torch.empty(rows_labels.shape, dtype=torch.float32, device=hidden.device) for name in names}
    stats = {name: DISTRIBUTION_STATISTICS.get(name) or _FUSED_FROM_CHUNK[name] for name in names}
    kwargs = {name: {hp: args[hp] for hp in stat.hyperparameters} for name, stat in stats.items()}
    for rows, logprobs in next_token_logprobs(rows_hidden, causal_lm):
        for name, stat in stats.items():
            values[name][rows] = stat.fn(logprobs, rows_labels[rows], **kwargs[name])
    out = {}
    for name in names:
        full = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)  # (B, T-1)
        full[mask] = values[name]
        out[name] = full
    return out


def causal_lm_of(model) -> torch.nn.Module:
    """The `PreTrainedModel` that carries the LM head, under DDP/FSDP wrappers and PEFT."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def capture_final_hidden_state(causal_lm):
    """Record the backbone's final hidden states during a forward, without changing it.

    TRL's fused head calls the backbone (`causal_lm.base_model`) and then projects only the supervised positions; a
    forward hook on the backbone lets the distribution statistics reuse those hidden states instead of running a
    second forward pass.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        captured["hidden"] = hidden.detach()

    handle = causal_lm.base_model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def forward_statistics(
    model,
    inputs: Mapping[str, Any],
    names: Iterable[str],
    args: Mapping[str, Any],
    keep_outputs: bool = True,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run `model` with TRL's fused LM head and return `(outputs, statistics)`.

    `names` are policy statistics (no prefix) wanted from this model; `outputs` keeps the gradient of `log_probs`
    for the loss, while every returned statistic is detached. Used for the policy and for model references alike.

    With `keep_outputs=False` (a reference, which needs no loss) and a distribution statistic among `names`, the
    backbone runs alone and one chunked projection serves every statistic: through the fused head, the supervised
    positions would be projected twice. `outputs` is then None.
    """
    names = list(dict.fromkeys(names))
    distribution = [name for name in names if name in DISTRIBUTION_STATISTICS]
    causal_lm = causal_lm_of(model)
    if distribution and not keep_outputs:
        backbone_inputs = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
        hidden = causal_lm.base_model(**backbone_inputs).last_hidden_state  # (B, T, H)
        return None, distribution_statistics(hidden, inputs["labels"], causal_lm, names, args)
    capture = capture_final_hidden_state(causal_lm) if distribution else nullcontext({})
    with capture as captured:
        outputs = model(**inputs, fused_lm_head=True)
    statistics = {}
    for name in names:
        if name in FUSED_STATISTICS:
            value = getattr(outputs, FUSED_STATISTICS[name])
            if value is None:
                raise RuntimeError(
                    f"The fused LM head of {type(causal_lm).__name__} does not compute '{FUSED_STATISTICS[name]}'."
                )
            statistics[name] = value.detach().float()
    if distribution:
        statistics.update(distribution_statistics(captured["hidden"], inputs["labels"], causal_lm, distribution, args))
    return outputs, statistics
