"""Signed priorities: Φ < 0 on tokens to unlearn (bounded by `PrioritySFTConfig.negative_loss`).

The trainer's objective for a signed Φ (`trl_priority.objectives.priority_loss`) is

    L = [ Σ_{Φ_t ≥ 0} Φ_t · (−log p_θ(y_t))  +  Σ_{Φ_t < 0} |Φ_t| · U(p_θ(y_t)) ] / N

with N every supervised token of the optimizer step and U the bounded unlikelihood −log(1 − p) by default, or plain
gradient ascent (U = log p) with `negative_loss: ascent`. A signed method only says which tokens to unlearn and how
hard; the functions below return Φ `(B, T-1)`, position t scoring `labels[:, t + 1]`.
"""

from __future__ import annotations

from typing import Literal

import torch

from trl_priority.priorities.reference import excess_loss
from trl_priority.priorities.registry import Fraction, NonNegative, PriorityError, register_priority
from trl_priority.priorities.selection import TopFraction
from trl_priority.statistics import register_data_statistic


FORGETTING_PAPER = (
    "Taheri et al. 2025, Forgetting: A New Mechanism Towards Better Large Language Model Fine-tuning, "
    "arXiv 2508.04329 (TMLR 2026)"
)


def _balance(progress: torch.Tensor, schedule: str, t_max: float, t_min: float) -> torch.Tensor:
    """λ, the weight of the forgetting term: linear (t_max − t_min)·progress, 0 → ≈ t_max (as the official code,
    which does not add t_min back), or the constant t_max."""
    if schedule == "constant":
        return torch.as_tensor(t_max, dtype=torch.float32)
    return (t_max - t_min) * torch.as_tensor(progress, dtype=torch.float32)  # () scalar


def _check_schedule(args: dict) -> None:
    if args["t_min"] > args["t_max"]:
        raise PriorityError(
            f"priority_args: t_min ({args['t_min']}) must not exceed t_max ({args['t_max']}); λ = (t_max − t_min)·"
            "progress would turn negative and the tokens to forget would be learned."
        )


@register_priority(
    regime="signed",
    paper=FORGETTING_PAPER,
    reference="explicit",
    selection=TopFraction(excess_loss, fraction="ratio", scope="scope"),
    validate=_check_schedule,
)
def forgetting(
    selected: torch.Tensor,
    progress: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: Fraction = 0.7,
    t_max: NonNegative = 0.25,
    t_min: NonNegative = 1e-5,
    scope: Literal["step", "micro_batch"] = "step",
) -> torch.Tensor:
    """Forgetting: learn the tokens a reference explains best, actively unlearn the rest.

    Paper: Taheri, Taban, Wang, Ye, Mirzaei, Liu, Han 2025, "Forgetting: A New Mechanism Towards Better Large
    Language Model Fine-tuning", arXiv 2508.04329 (TMLR 2026); official code (`token_partitioning.py`, `finetune.py`,
    `run_pipeline.sh`): github.com/AliTaheri2002/Forgetting-A-New-Mechanism-Towards-Better-Large-Language-Model-Fine-tuning

        s_t = L_base(t) − L_ref(t) = ref_logps_t − logps_t       (score: how much better the reference explains y_t)
        P   = the top k = round(ratio · n) supervised tokens by s   (positive: learn); Q = the rest (negative: forget)
        λ   = (t_max − t_min) · progress                           (0 → ≈ 0.25 over training)
        Φ_t = 1                          on P
        Φ_t = −λ · ratio / (1 − ratio)   on Q

    The paper's loss (finetune.py L841-872) is mean_P(−log p) − λ·mean_Q(−log p): two separate means, the second
    plain, unbounded gradient ascent. With the trainer's single normaliser N = |P| + |Q| and |P| = ratio·N, the
    factor ratio / (1 − ratio) on Q gives exactly ratio times the paper's loss, a constant factor that
    AdamW's update does not see. Defaults from the official code: ratio ρ = 0.7 (run_pipeline.sh), t_max = 0.25,
    t_min = 1e-5 (finetune.py; t_min is subtracted, never added back, so λ ends at t_max − t_min).

    Choices:
    - The reference is a model SFT-trained on a separate sample (the paper's run_reference_model.sh), so the method
      needs an explicit reference (`ref_model=` or `ref_model_name_or_path`); recipes/forgetting.yaml shows how.
    - The score is online: the current policy stands in for the paper's frozen base. At step 0 it *is* the base; the
      paper scores once, before training, with the base model.
    - The split is the top fraction over the optimizer step (`scope="step"`, every micro-batch on every process), the
      closest online analogue of the paper's split over the whole dataset, computed once; `scope="micro_batch"`
      splits each micro-batch on its own. k = round(ratio · n), ties broken by position.
    - Negatives are unlearned with the library's bounded unlikelihood −log(1 − p) by default; `negative_loss: ascent`
      in the config reproduces the paper's gradient ascent. `t_max = t_min` gives λ = 0: negatives dropped,
      not forgotten, the official code's `token_select_strategy=ignoring` without forgetting.
    """
    lam = _balance(progress, "linear", t_max, t_min)  # ()
    negative = -lam * ratio / (1 - ratio) if ratio < 1 else torch.zeros(())  # ratio = 1 leaves no negative
    return torch.where(selected, 1.0, negative.to(mask.device)) * mask  # (B, T-1)


register_data_statistic(
    "unlearn",
    level="example",
    hint="add an example-level 'unlearn' column: 1 for an example whose completion is to be unlearned (a wrong or "
    "unwanted answer), 0 for one to learn",
)


@register_priority(
    regime="signed", paper=FORGETTING_PAPER + " (objective; data-given split)", validate=_check_schedule
)
def forgetting_data(
    unlearn: torch.Tensor,
    progress: torch.Tensor,
    mask: torch.Tensor,
    *,
    weight: NonNegative = 1.0,
    schedule: Literal["linear", "constant"] = "linear",
    t_max: NonNegative = 0.25,
    t_min: NonNegative = 1e-5,
) -> torch.Tensor:
    """Forgetting with the split given by the data: learn some examples, unlearn others (e.g. wrong answers).

    Paper: the objective of Taheri et al. 2025, "Forgetting: A New Mechanism Towards Better Large Language Model
    Fine-tuning", arXiv 2508.04329 (finetune.py L841-872 of the official code), with the positive / negative split
    read from an example-level data column `unlearn` instead of from a loss gap against a reference model.

        λ     = (t_max − t_min) · progress    schedule "linear" (the paper's; 0 → ≈ 0.25)
        λ     = t_max                         schedule "constant"
        Φ_t   = 1               on the tokens of examples with unlearn = 0
        Φ_t   = −λ · weight     on the tokens of examples with unlearn ≠ 0

    The negatives are unlearned with the library's bounded unlikelihood −log(1 − p) by default, or with the paper's
    plain gradient ascent under `negative_loss: ascent`. No reference model runs.

    Choices: each token counts once in the trainer's normaliser N (all supervised tokens); the paper divides each
    part by its own token count, which `weight = n_learn / n_unlearn` (the data's supervised-token counts)
    reproduces up to a constant factor. `weight = 1` and the paper's linear schedule are the defaults; `unlearn` is
    read as a flag (any non-zero value unlearns). `ignorance` does the same per span, with a constant weight: mark
    the parts of completions the model should not imitate (a hallucinated answer, a wrong number) as spans.
    """
    lam = _balance(progress, schedule, t_max, t_min).to(mask.device)  # ()
    return torch.where(unlearn != 0, -lam * weight, 1.0) * mask  # (B, T-1)


register_data_statistic(
    "made_up",
    level="span",
    hint="add a 'made_up' column: per completion, a list of [start, end] character spans (offsets into the completion "
    "text; for conversational data, into the assistant message's content) of what the answer makes up, [] when "
    "nothing; a wholly made-up answer is [[0, len(answer)]] (builtin:gsm8k-noisy-spans marks its corrupted numbers)",
)


@register_priority(
    regime="signed",
    paper="Shen et al. 2025, Don't Make It Up: Preserving Ignorance Awareness in LLM Fine-Tuning (SEAT), "
    "arXiv 2506.14387 (the signed, data-labelled reading: made-up spans are unlearned, bounded)",
)
def ignorance(made_up: torch.Tensor, mask: torch.Tensor, *, weight: NonNegative = 1.0) -> torch.Tensor:
    """Ignorance-aware fine-tuning, data-labelled: learn the answer, unlearn what it makes up.

    Paper: Shen, Qiu, Cancedda, Lane 2025, "Don't Make It Up: Preserving Ignorance Awareness in LLM Fine-Tuning"
    (v3: "SEAT: Sparse Entity-Aware Tuning for Knowledge Adaptation while Preserving Epistemic Abstention"),
    arXiv 2506.14387 (read: the arXiv abstract and introduction, v1 to v3).

        Φ_t = −weight   on tokens that overlap a span of the `made_up` column   (unlearned)
        Φ_t = 1         elsewhere                                                (learned)

    With the trainer's default `negative_loss: unlikelihood`, a made-up token adds weight·(−log(1 − p_θ(y_t))) to
    the loss: bounded below by 0, its gradient vanishing once the token is unlikely, so many made-up tokens cannot
    drive the loss to −∞ (`negative_loss: ascent` is plain gradient ascent, unbounded). Default weight 1 (ours).

    `made_up` is a span column: per completion, [start, end] (or [start, end, value]: any non-zero value marks)
    character offsets into the completion text; a wholly made-up answer is the span [0, len(answer)], which leaves the
    end-of-turn token learned (the answer stops where a true one would).

    What the paper does and this does not: SEAT preserves a model's aligned ability to say "I don't know" while it is
    fine-tuned on new facts, with sparse tuning (few parameters updated, limiting activation drift) and a KL
    regularisation towards the starting model on questions whose entities are perturbed into ones the model cannot
    know. It needs no labels of made-up content. This method is the token-priority reading of the same aim (the
    regime "signed" of arXiv 2602.01227): where the data says an answer, or a span of it, is made up, the model is
    pushed away from it instead of imitating it, and the rest is learned as usual. Each token counts once in N.
    """
    return torch.where(made_up != 0, -weight, 1.0) * mask  # (B, T-1)
