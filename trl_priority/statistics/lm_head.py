"""The package's own chunked LM-head pass, for the methods that read the whole next-token distribution.

Methods that need only per-token `logps` and `entropy` use TRL's public fused head (`fused_lm_head=True`), unchanged.
A method that reads the whole distribution at each supervised position (a distribution statistic such as `mass`, a
reference's distribution, a `DistributionTerm` such as asft's KL anchor) gets this pass instead, over the final
hidden states `h` `(N, H)` of its N supervised rows and the LM head `W` `(V, H)`, n rows at a time:

    z_t  = c·tanh(s·(W h_t + b)/c)                       logits (scale s, soft cap c when the model has them)
    ℓ_t  = log_softmax(z_t)                              (V,) float32
    L    = Σ_t w_t·(−ℓ_t[y_t]) + Σ_terms λ_i Σ_t term_i(ℓ_t, y_t, ℓ_ref,t, ...)

in two loops over the same chunks:

1. `statistics_pass` (no gradient): every statistic requested (`logps`, `entropy`, `is_top1`, `mass`, ... and a
   reference's) from one projection per chunk. The trainer then computes Φ, which may depend on the whole batch.
2. `objective_pass`: the loss L with w = Φ (its non-negative part when negatives are unlearned by a term) and the
   declared terms, as a `torch.autograd.Function` that computes each chunk's gradient with respect to its logits
   during the forward (the Liger-Kernel chunked-loss pattern) and turns it at once into the gradients of `h`
   (`(N, H)`) and `W` (accumulated in the weight's own dtype): the backward only scales them. No `(N, V)` tensor
   outlives its chunk, and the only `V × H` buffer is the weight gradient in the weight's dtype.

Projections: the policy's head twice per row (as TRL's fused head: forward and its backward's recompute), the
reference's once for its distribution terms (a second time only when Φ itself reads a reference statistic computed
from its distribution, which must be known before the terms), never a second policy projection with gradient.

Logits are products in the compute dtype (autocast's, else the hidden states') accumulated in float32: rounding the
logits to bf16 before the softmax would cost about 1e-2 in log-probability.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx


# A statistic of a chunk: (log-probabilities (n, V) float32, labels (n,)) -> (n,)
ChunkStatistic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------------------------
# The LM head, gathered
# ------------------------------------------------------------------------------------------------------------------
def logit_transform(config) -> tuple[float, float | None]:
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


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b `(n, m)` float32: products in the operands' dtype, accumulated in float32, outside autocast (whose CPU
    `mm` would round the product to bf16)."""
    with torch.autocast(a.device.type, enabled=False):
        if a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a.float(), b.float())


@dataclass
class Head:
    """An LM head ready to project: its whole weight `(V, H)` (gathered), bias, logit scale and soft cap."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def raw_logits(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W h + b `(n, V)` float32 for `hidden` `(n, H)`, no gradient: products in `dtype`, float32 accumulation."""
        with torch.no_grad():
            logits = mm_fp32(hidden.detach().to(dtype), self.weight.detach().to(dtype).t())  # (n, V)
            if self.bias is not None:
                logits = logits + self.bias.detach().float()
        return logits

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """z = c·tanh(s·raw / c) (scale s, soft cap c, each when the model has it), differentiable."""
        if self.scale != 1.0:  # most models: no copy of the (n, V) chunk
            raw = raw * self.scale
        if self.softcap is not None:
            raw = self.softcap * torch.tanh(raw / self.softcap)
        return raw

    def logprobs(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """log_softmax(z) `(n, V)` float32, no gradient."""
        with torch.no_grad():
            return self.transform(self.raw_logits(hidden, dtype)).log_softmax(-1)


@contextmanager
def gathered_head(causal_lm):
    """The LM head of `causal_lm`, whole, while the block runs: gathered by TRL's public `maybe_gather_lm_head_ctx`
    under DeepSpeed ZeRO-3 (as TRL's fused head does), made full (a differentiable all-gather) for an FSDP2 DTensor."""
    module = causal_lm.get_output_embeddings()
    weight, bias = module.weight, module.bias
    with maybe_gather_lm_head_ctx(weight, bias):
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor, as in TRL's fused head
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        yield Head(weight, bias, *logit_transform(causal_lm.config))


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the LM head multiplies in: autocast's when it is on, else the hidden states'."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


# ------------------------------------------------------------------------------------------------------------------
# The per-token statistics TRL's fused head gives, from a chunk of log-probabilities (for methods served here)
# ------------------------------------------------------------------------------------------------------------------
def label_logprob(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y_t) `(n,)`."""
    return logprobs.gather(1, labels[:, None]).squeeze(1)


def entropy(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """H(π) = −Σ_v π(v)·log π(v) `(n,)`; a −inf log-probability counts 0."""
    return -torch.where(logprobs > -torch.inf, logprobs.exp() * logprobs, 0.0).sum(-1)


def is_top1(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 where the label is the argmax (the first one among ties, as TRL's `is_top1`), else 0: `(n,)` float."""
    return (logprobs.argmax(-1) == labels).float()


FUSED_FROM_CHUNK: dict[str, ChunkStatistic] = {"logps": label_logprob, "entropy": entropy, "is_top1": is_top1}


# ------------------------------------------------------------------------------------------------------------------
# The reference at the pass's rows
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceRows:
    """The reference's next-token distribution at the pass's N rows: a model's head over its hidden states
    `(N, H_ref)`, or a top-k cache (`trl_priority.references.topk.TopKRows`) whose tail is shaped like the policy."""

    head: Head | None = None
    hidden: torch.Tensor | None = None  # (N, H_ref), no gradient
    topk: object | None = None  # TopKRows

    def logprobs(self, rows: slice, labels: torch.Tensor, policy_logprobs: torch.Tensor) -> torch.Tensor:
        """log π_ref `(n, V)` float32 at `rows`, no gradient."""
        if self.head is not None:
            return self.head.logprobs(self.hidden[rows], compute_dtype(self.hidden))
        return self.topk.logprobs(rows, labels, policy_logprobs.detach())


def chunks(num_rows: int, chunk_rows: int):
    """The slices of n ≤ `chunk_rows` rows that cover `num_rows` (the last one shorter when it does not divide)."""
    for start in range(0, num_rows, max(1, chunk_rows)):
        yield slice(start, min(start + max(1, chunk_rows), num_rows))


# ------------------------------------------------------------------------------------------------------------------
# 1. Statistics, no gradient
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def statistics_pass(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Head,
    statistics: Mapping[str, ChunkStatistic],
    chunk_rows: int,
    reference: ReferenceRows | None = None,
    ref_statistics: Mapping[str, ChunkStatistic] | None = None,
) -> dict[str, torch.Tensor]:
    """Each statistic of `statistics` (and, as `ref_<name>`, of `ref_statistics` under `reference`) at the rows
    `hidden` `(N, H)` with labels `(N,)`: `{name: (N,) float32}`. One projection of each head per chunk; the policy's
    is skipped when only a model reference's statistics are asked (a top-k reference's tail is shaped like it)."""
    ref_statistics = ref_statistics or {}
    num_rows = labels.numel()
    values = {name: hidden.new_zeros(num_rows, dtype=torch.float32) for name in statistics}
    values.update({f"ref_{name}": hidden.new_zeros(num_rows, dtype=torch.float32) for name in ref_statistics})
    project_policy = bool(statistics) or (reference is not None and reference.topk is not None)
    dtype = compute_dtype(hidden)
    for rows in chunks(num_rows, chunk_rows):
        logprobs = head.logprobs(hidden[rows], dtype) if project_policy else None  # (n, V)
        for name, fn in statistics.items():
            values[name][rows] = fn(logprobs, labels[rows]).float()
        if ref_statistics:
            ref_logprobs = reference.logprobs(rows, labels[rows], logprobs)  # (n, V)
            for name, fn in ref_statistics.items():
                values[f"ref_{name}"][rows] = fn(ref_logprobs, labels[rows]).float()
    return values


# ------------------------------------------------------------------------------------------------------------------
# 2. The objective, with gradient
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkTerm:
    """A distribution term as the pass calls it: `fn(logprobs (n, V) with gradient, labels (n,), ref_logprobs (n, V)
    or None, rows: slice) -> (n,)`, scaled by `weight` in the objective."""

    name: str
    weight: float
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, slice], torch.Tensor]


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, in acc's dtype when the operands share it (the weight gradient of a bf16 weight stays bf16),
    else through a float32 product."""
    if acc.dtype == a.dtype == b.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(mm_fp32(a, b).to(acc.dtype))


class _ChunkedObjective(torch.autograd.Function):
    """L(h, W, b) chunk by chunk, with its gradients computed in the forward and only scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):  # run: the chunk loop, a closure over everything else
        total, grad_hidden, grad_weight, grad_bias = run(hidden, weight, bias)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = ctx.saved_tensors

        def scaled(grad, dtype):
            return None if grad is None else (grad * grad_total.to(grad.dtype)).to(dtype)

        return (*(scaled(g, d) for g, d in zip(grads, ctx.dtypes)), None)


def objective_pass(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Head,
    nll_weight: torch.Tensor,
    terms: Sequence[ChunkTerm],
    chunk_rows: int,
    reference: ReferenceRows | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = Σ_t w_t·(−log π(y_t)) + Σ_i λ_i Σ_t term_i,t at the rows `hidden` `(N, H)`, labels `(N,)`, w = `nll_weight`
    `(N,)` (no gradient).

    Returns `(L, term_values)`: L a float32 scalar with gradient to `hidden`, `head.weight` and `head.bias`, and each
    term's per-row values `(N,)` (unweighted, no gradient). A term that reads `ref_logprobs` gets the reference's
    log-probabilities of the same chunk (projected here once; pass `reference` only when a term reads it).
    """
    num_rows = labels.numel()
    term_values = {term.name: hidden.new_zeros(num_rows, dtype=torch.float32) for term in terms}
    dtype = compute_dtype(hidden)
    nll_weight = nll_weight.detach().float()

    def run(hidden_, weight, bias):
        grad_hidden = torch.zeros_like(hidden_, dtype=torch.float32) if hidden_.requires_grad else None  # (N, H)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None  # (V, H), the weight's dtype
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        needs_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        weight_c = weight.detach().to(dtype)  # (V, H), cast once
        total = hidden_.new_zeros((), dtype=torch.float32)
        for rows in chunks(num_rows, chunk_rows):
            h = hidden_[rows].detach().to(dtype)  # (n, H)
            raw = head.raw_logits(h, dtype)  # (n, V) float32
            with torch.enable_grad():
                raw.requires_grad_(needs_grad)
                logprobs = head.transform(raw).log_softmax(-1)  # (n, V)
                ref_logprobs = None
                if reference is not None:
                    ref_logprobs = reference.logprobs(rows, labels[rows], logprobs.detach())  # (n, V), projected once
                nll = -label_logprob(logprobs, labels[rows])  # (n,)
                chunk_total = (nll_weight[rows] * nll).sum()
                for term in terms:
                    per_row = term.fn(logprobs, labels[rows], ref_logprobs, rows)  # (n,)
                    term_values[term.name][rows] = per_row.detach().float()
                    chunk_total = chunk_total + term.weight * per_row.sum()
            total = total + chunk_total.detach()
            if not needs_grad:
                continue
            (grad_raw,) = torch.autograd.grad(chunk_total, raw)  # (n, V) float32: dL/d(W h + b)
            grad_raw_c = grad_raw.to(dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = mm_fp32(grad_raw_c, weight_c)  # (n, H)
            if grad_weight is not None:
                _accumulate(grad_weight, grad_raw_c.t(), h)  # (V, H)
            if grad_bias is not None:
                grad_bias += grad_raw.sum(0)
        return total, grad_hidden, grad_weight, grad_bias

    total = _ChunkedObjective.apply(hidden, head.weight, head.bias, run)
    return total, term_values
