"""A reference's next-token distribution as a cache can hold it: its k most likely tokens and the rest as one mass.

Methods whose loss reads the reference's whole distribution (ASFT's KL anchor, Target-SFT's reference prior) cannot
cache a vocabulary of probabilities per token: 49k float32 values per token is 200 kB, a GSM8K epoch hundreds of GB.
A top-k cache keeps, per supervised token,

    ids          (k,)  the k most likely next tokens under the reference, most likely first
    logps        (k,)  their log-probabilities log π_ref(ids_j)
    label_logps  ()    log π_ref(y_t) of the observed token, exactly (it need not be among the k)

and the chunked distribution pass rebuilds a full `(n, V)` distribution for each chunk of positions from it:

    π̂(v) = π_ref(v)                     for v among the ids, or v = y_t
    π̂(v) = tail / (V − m)               for the V − m other tokens, tail = 1 − Σ_{stored} π_ref

(m the number of distinct stored tokens), i.e. the tail mass spread evenly over the tokens that were not stored. π̂
sums to 1, agrees with π_ref wherever it is stored, and its total-variation distance to π_ref is at most the tail mass:
TV(π̂, π_ref) ≤ tail. Every term in `trl_priority.priorities.distribution` has a gradient with respect to the
policy's logits of the form π_θ − (a mixture involving π_ref), so the gradient error it makes is bounded by the tail
mass too (in L1, ≤ 2·tail per position, times the term's weight). The KL value itself is off by
Σ_tail π_ref·log(π_ref/π̂), which the uniform spread underestimates for a peaked tail; `scripts/measure_topk_error.py`
measures both errors on a real model.

The choice of a uniform tail is ours; ASFT and Target-SFT define their terms on the exact distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    ids: torch.Tensor, logps: torch.Tensor, label_logps: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """The `(n, V)` log-probabilities log π̂ rebuilt from a top-k cache (see the module docstring), float32."""
    n, k = ids.shape
    label_stored = (ids == labels[:, None]).any(-1)  # (n,)
    stored = logps.float().exp().sum(-1) + torch.where(label_stored, 0.0, label_logps.float().exp())  # (n,)
    num_stored = k + (~label_stored).long()  # (n,) ids are distinct (topk), the label adds one when not among them
    tail = (1.0 - stored).clamp(min=_MIN_TAIL)  # (n,)
    others = vocab_size - num_stored  # (n,)
    fill = torch.where(others > 0, tail.log() - others.clamp(min=1).float().log(), -torch.inf)  # (n,)
    out = fill[:, None].expand(n, vocab_size).clone()  # (n, V)
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

    def logprobs(self, rows: slice, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """log π̂ for the rows `rows` (labels: those rows' observed tokens): `(n, V)` float32."""
        return dense_logprobs(self.ids[rows], self.logps[rows], self.label_logps[rows], labels, vocab_size)


__all__ = ["TopKReferenceDistribution", "TopKRows", "dense_logprobs", "topk_of"]
