"""A reference's next-token distribution as a cache can hold it: its k most likely tokens and the rest as one mass.

Methods whose loss reads the reference's whole distribution (ASFT's KL anchor, Target-SFT's reference prior) cannot
cache a vocabulary of probabilities per token: 49k float32 values per token is 200 kB, a GSM8K epoch hundreds of GB.
A top-k cache keeps, per supervised token,

    ids          (k,)  the k most likely next tokens under the reference, most likely first
    logps        (k,)  their log-probabilities log π_ref(ids_j)
    label_logps  ()    log π_ref(y_t) of the observed token, exactly (it need not be among the k)

and the chunked distribution pass rebuilds a full `(n, V)` distribution for each chunk of positions from it:

    π̂(v) = π_ref(v)                                  for v among the ids, or v = y_t
    π̂(v) = tail · π_θ(v) / Σ_{v' not stored} π_θ(v')   for the other tokens, tail = 1 − Σ_{stored} π_ref

i.e. the reference's tail mass is shared among the tokens that were not stored as the policy shares its own (the
policy's log-probabilities are at hand in the same chunk; π̂ carries no gradient). π̂ sums to 1, agrees with π_ref
wherever it is stored, and its total-variation distance to π_ref is at most the tail mass. Every term in
`trl_priority.priorities.distribution` has a gradient with respect to the policy's logits of the form π_θ − (a
mixture involving π_ref), so the gradient error is bounded by the tail mass too (in L1, ≤ 2·tail per position, times
the term's weight). On the tail, KL(π̂ ‖ π_θ) is the KL of the coarsened pair (the tail as one outcome), so the
approximate KL anchor never exceeds the exact one there (the data-processing inequality); on a policy that has not
moved, it is exact.

Why the policy's shape and not an even spread: an even spread puts reference mass on tokens the policy finds
vanishingly unlikely, and log(π̂/π_θ) blows up there; `scripts/measure_topk_error.py` measures both on SmolLM2 and
GSM8K (`docs/benchmarks/topk_error.md`). These choices are ours; ASFT and Target-SFT define their terms on the exact
distribution.

`reference_topk` computes the cached columns from a reference's final hidden states, a chunk of positions at a time
(`trl_priority.references.precompute` calls it while computing a disk-cache entry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trl_priority import statistics as stats_vocab
from trl_priority.statistics import lm_head


# A floor for the tail mass: rounding can make Σ_stored π_ref exceed 1 by a few ulps
_MIN_TAIL = 1e-12


def topk_of(logprobs: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a top-k cache stores of `(n, V)` reference log-probabilities at positions labelled `labels` `(n,)`.

    Returns `(ids (n, k) long, logps (n, k) float32, label_logps (n,) float32)`, ids most likely first.
    """
    k = min(k, logprobs.size(-1))
    logps, ids = logprobs.float().topk(k, dim=-1)  # (n, k)
    label_logps = logprobs.float().gather(-1, labels[:, None]).squeeze(-1)  # (n,)
    return ids, logps, label_logps


def dense_logprobs(
    ids: torch.Tensor,
    logps: torch.Tensor,
    label_logps: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    tail_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `(n, V)` log-probabilities log π̂ rebuilt from a top-k cache (see the module docstring), float32.

    The tail mass goes to the tokens that were not stored in proportion to `tail_logprobs` `(n, V)` (the policy's
    log-probabilities, in training), or evenly when it is None.
    """
    n, k = ids.shape
    label_stored = (ids == labels[:, None]).any(-1)  # (n,)
    stored_mass = logps.float().exp().sum(-1) + torch.where(label_stored, 0.0, label_logps.float().exp())  # (n,)
    tail = (1.0 - stored_mass).clamp(min=_MIN_TAIL)  # (n,)
    if tail_logprobs is None:
        num_stored = k + (~label_stored).long()  # (n,) topk ids are distinct; the label adds one when not among them
        others = vocab_size - num_stored  # (n,)
        fill = torch.where(others > 0, tail.log() - others.clamp(min=1).float().log(), -torch.inf)  # (n,)
        out = fill[:, None].expand(n, vocab_size).clone()  # (n, V)
    else:
        # log π̂(v) = log tail + log q(v) − log Σ_{v' not stored} q(v')
        is_stored = torch.zeros(n, vocab_size, dtype=torch.bool, device=ids.device)
        is_stored.scatter_(1, ids, True).scatter_(1, labels[:, None], True)
        shape = tail_logprobs.float().masked_fill(is_stored, -torch.inf)  # (n, V)
        out = tail.log()[:, None] + shape - shape.logsumexp(-1, keepdim=True)  # (n, V)
    out.scatter_(1, labels[:, None], label_logps.float()[:, None])
    out.scatter_(1, ids, logps.float())
    return out


@dataclass
class TopKReferenceDistribution:
    """A top-k cache of the reference's distribution at the supervised positions of a batch, for distribution terms.

    Passed as the `reference` of a `trl_priority.statistics.DistributionRequest` instead of the reference's hidden
    states; the chunked pass rebuilds each chunk's `(n, V)` log π̂ with `dense_logprobs`. Tensors are `(B, T-1, k)`
    and `(B, T-1)`, aligned with the policy's statistics (position t scores labels[:, t + 1]).
    """

    ids: torch.Tensor  # (B, T-1, k) long
    logps: torch.Tensor  # (B, T-1, k) float32
    label_logps: torch.Tensor  # (B, T-1) float32
    statistics: tuple[str, ...] = ()  # computed from π̂ in the pass, like a model reference's

    def rows(self, mask: torch.Tensor) -> TopKRows:
        device = mask.device
        return TopKRows(
            self.ids.to(device)[mask], self.logps.to(device)[mask].float(), self.label_logps.to(device)[mask].float()
        )


@dataclass
class TopKRows:
    """The supervised positions of a `TopKReferenceDistribution`, flattened like the distribution pass's rows."""

    ids: torch.Tensor  # (N, k)
    logps: torch.Tensor  # (N, k)
    label_logps: torch.Tensor  # (N,)

    def logprobs(self, rows: slice, labels: torch.Tensor, policy_logprobs: torch.Tensor) -> torch.Tensor:
        """log π̂ for the rows `rows` (`labels`: their observed tokens), the tail shaped like the policy's
        `policy_logprobs` `(n, V)` there: `(n, V)` float32, no gradient."""
        return dense_logprobs(
            self.ids[rows],
            self.logps[rows],
            self.label_logps[rows],
            labels,
            policy_logprobs.size(-1),
            tail_logprobs=policy_logprobs.detach(),
        )


__all__ = ["TopKReferenceDistribution", "TopKRows", "dense_logprobs", "topk_of"]


def reference_topk(
    distribution: stats_vocab.ReferenceDistribution,
    labels: torch.Tensor,
    names: Sequence[str],
    args: Mapping[str, Any],
    k: int,
    chunk_elements: int | None = None,
) -> dict[str, torch.Tensor]:
    """The top-k cache of a reference's distribution, from its final hidden states `(B, T, H)`.

    The supervised positions are projected through the reference's LM head a chunk at a time (float32 logits, as the
    training pass projects them: `trl_priority.statistics.lm_head.Head.logprobs`), and of each chunk's log π_ref `(n, V)` are kept

        ref_topk_ids    (B, T-1, k) int32    the k most likely next tokens, most likely first (`topk_of`)
        ref_topk_logps  (B, T-1, k) float32  their log-probabilities
        ref_<name>      (B, T-1)    float32  each statistic of `names` (`logps`: log π_ref(y_t)), exact

    all 0 at positions whose label is not supervised. k is capped at the vocabulary size.
    """
    hidden = distribution.hidden
    shifted = labels[:, 1:].to(hidden.device)  # (B, T-1)
    mask = shifted != -100  # (B, T-1)
    rows_hidden = hidden[:, :-1][mask]  # (N, H)
    rows_labels = shifted[mask]  # (N,)
    num_rows = rows_labels.numel()
    stats = stats_vocab.chunk_statistics(names, args)  # name -> fn(logprobs, labels)
    dtype = lm_head.compute_dtype(hidden)
    with torch.no_grad(), lm_head.gathered_head(distribution.causal_lm) as head:
        vocab = head.weight.shape[0]
        k = min(k, vocab)
        step = max(1, stats_vocab.chunk_elements_for(hidden.device, chunk_elements) // vocab)
        values = {f"ref_{name}": hidden.new_zeros(num_rows, dtype=torch.float32) for name in names}  # (N,)
        ids = torch.zeros(num_rows, k, dtype=torch.int32, device=hidden.device)  # (N, k)
        logps = torch.zeros(num_rows, k, dtype=torch.float32, device=hidden.device)  # (N, k)
        for start in range(0, num_rows, step):
            rows = slice(start, start + step)
            logprobs = head.logprobs(rows_hidden[rows], dtype)  # (n, V)
            top_ids, logps[rows], _ = topk_of(logprobs, rows_labels[rows], k)
            ids[rows] = top_ids.int()
            for name, fn in stats.items():
                values[f"ref_{name}"][rows] = fn(logprobs, rows_labels[rows])
    out = {}
    for name, value in {**values, "ref_topk_ids": ids, "ref_topk_logps": logps}.items():
        full = value.new_zeros((*mask.shape, *value.shape[1:]))  # (B, T-1) or (B, T-1, k)
        full[mask] = value
        out[name] = full
    return out
