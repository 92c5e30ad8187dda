"""Privacy-aware priority: ATDP's per-token budget allocation by utility (the Φ half; DP-SGD is `trl_priority.beyond_tokens.privacy`)."""

from __future__ import annotations

import re

import torch

from trl_priority.priorities.registry import Probability, register_priority
from trl_priority.statistics import register_data_statistic


# A stand-in PII detector over the completion text: e-mail addresses, runs of 7+ digits (phone and account numbers)
# and capitalised words that are not common sentence openers (names). Real use gives a `pii` column from a real
# detector (for example Microsoft Presidio): a column wins over this derivation.
_EMAIL = r"[\w.+-]+@[\w-]+\.[\w.]+"
_LONG_NUMBER = r"\+?\d[\d -]{5,}\d"
_CAPITALISED = r"\b[A-Z][a-z]{2,}\b"
_NOT_NAMES = set(
    "The She He They It In If So Then There This That What How Each Total And But For On At After Since First Second "
    "Third Finally Therefore Thus Now His Her Their One Two Three Four Five Six Seven Eight Nine Ten When While With "
    "From Answer Let Per Both All Half Every".split()
)


def _pii_spans(completion: str, args) -> list[list[int]]:
    spans = [[m.start(), m.end()] for pattern in (_EMAIL, _LONG_NUMBER) for m in re.finditer(pattern, completion)]
    spans += [[m.start(), m.end()] for m in re.finditer(_CAPITALISED, completion) if m.group() not in _NOT_NAMES]
    return sorted(spans)


register_data_statistic(
    "pii",
    level="span",
    derive=_pii_spans,
    hint="ATDP finds PII in each completion with a regex stand-in (e-mails, long numbers, names); a dataset may give "
    "a 'pii' column of [start, end] character spans from a real PII detector instead",
)


@register_priority(
    regime="soft",
    paper="Yu et al. 2025, ATDP (token-level privacy budget by utility), via the position paper arXiv 2602.01227, "
    "Table 1; DP-SGD with Opacus (`differential_privacy`)",
)
def atdp(pii: torch.Tensor, mask: torch.Tensor, *, pii_budget: Probability = 0.1) -> torch.Tensor:
    """ATDP: each token's share of an example's privacy budget follows its utility over its privacy cost.

    Paper: Yu et al. 2025 (ATDP), read through the position paper (arXiv 2602.01227, Table 1 and §5), which gives
    Φ(x) ∝ Utility(x) / PrivacyBudget, with utility scores derived from PII detection. The paper itself was not
    available here; the reading below is ours.

        Φ_t = Utility_t / Cost_t,   Utility_t = 1,   Cost_t = 1 / pii_budget on PII tokens, 1 elsewhere
            = pii_budget on tokens that overlap a `pii` span, 1 elsewhere

    `pii` is a span column (character offsets into the completion), derived by a regex stand-in for a PII detector
    (e-mail addresses, runs of 7+ digits, capitalised words that are not common sentence openers) unless the data
    gives it. Default pii_budget = 0.1 (ours): a PII token gets a tenth of a plain token's share.

    The privacy guarantee comes from training with `differential_privacy` set (`trl_priority.beyond_tokens.privacy`: Opacus'
    per-example clipping, noise and RDP accountant, ε logged): the clipping bounds each example's whole
    contribution, so Φ reallocates that bounded budget between its tokens without changing (ε, δ). Without
    `differential_privacy` this is only a down-weighting of PII tokens, with no guarantee. What the paper may do and
    this does not: a learned or model-based utility score, a per-token noise or clipping schedule.
    """
    return torch.where(pii != 0, pii_budget, 1.0) * mask  # (B, T-1)
