"""Contrastive and information-gain priorities: Φ from per-token scores computed offline with other models.

- `critical`: critical tokens by contrastive estimation between a model fine-tuned on correct solutions and one
  fine-tuned on incorrect solutions (cDPO's token weights, as a signed priority);
- `critical_counterfactual`: the position paper's Table 1 reading of critical tokens, a hard selection of the tokens
  whose deletion changes the loss of the rest of the completion by more than δ (their counterfactual impact);
- `tshirt`: the tokens whose prediction the prompt changes most (T-SHIRT's informative tokens, as a mask).

Each reads a token-level data column that `trl_priority.tools.token_scores` computes once, before training (the library has
one reference slot, T-SHIRT needs a forward without the prompt, the counterfactual one forward per deleted token):
`contrastive_score`, `counterfactual_impact` and `information_gain`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from trl_priority.priorities import signed  # noqa: F401  (registers the example-level `unlearn` statistic that `critical` reads)
from trl_priority.priorities.registry import Fraction, NonNegative, PriorityError, register_priority
from trl_priority.priorities.selection import TopFraction
from trl_priority.statistics import register_data_statistic


register_data_statistic(
    "contrastive_score",
    level="token",
    hint="`critical` reads one contrastive-estimation score per token of `input_ids` (the value at i scores token "
    "i): compute the column once with `trl_priority.tools.token_scores.contrastive_token_scores(positive_model, "
    "negative_model, dataset, tokenizer)`, or `python -m trl_priority.tools.token_scores contrastive --positive P "
    "--negative N --dataset D --output OUT` and train on OUT (recipes/critical.yaml says how)",
)


@register_priority(
    regime="signed",
    paper="Lin et al. 2024, Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning "
    "Capability (cDPO), arXiv 2411.19943 (ICML 2025)",
)
def critical(
    contrastive_score: torch.Tensor,
    unlearn: torch.Tensor,
    mask: torch.Tensor,
    *,
    only_neg: bool = True,
    rejected_weight: NonNegative = 1.0,
) -> torch.Tensor:
    """Critical tokens (cDPO's token weights): learn correct solutions, unlearn the critical tokens of wrong ones.

    Paper: Lin, Liang, Xu, Liu, Wang, Luo, Shi, Li, Yang, Tu 2024, "Critical Tokens Matter: Token-Level Contrastive
    Estimation Enhances LLM's Reasoning Capability", arXiv 2411.19943 (ICML 2025); official code
    github.com/chenzhiling9954/Critical-Tokens-Matter (src/pipeline.py, src/train/train_cdpo.py,
    src/configs/train_config.py).

        s_t = softmax_v(2·z_pos(v) − z_neg(v))[y_t]     (the `contrastive_score` column, β = 1)
        Φ_t = 1                         on a correct solution (unlearn = 0)          only_neg = True (default)
        Φ_t = s_t                       on a correct solution                        only_neg = False
        Φ_t = −rejected_weight·(1 − s_t)  on an incorrect solution (unlearn ≠ 0)       rejected_weight = 1

    z_pos and z_neg are the logits of two copies of the model fine-tuned on its own correct and incorrect sampled
    solutions (pipeline.py L251-266, train_sft.py: LoRA r = 8 on the MLP, lr 3e-4, one epoch). s_t is near 0 on a
    *critical token*, one the incorrect-solution model predicts and the correct-solution model does not
    (pipeline.py L224-234: `cd_logits = (1 + 1) * pos_logits - 1 * neg_logits`, softmax, gathered at the next
    token). Compute the column once with `trl_priority.tools.token_scores.contrastive_token_scores`; `unlearn` is the
    example-level column saying which completions are incorrect (builtin:gsm8k-contrast has both kinds).

    From cDPO to a priority. cDPO (train_cdpo.py `dpo_loss`, L118-176) is DPO with per-token weights, over pairs of a
    correct (chosen) and an incorrect (rejected) solution of the same question: at each position t,
    ℓ_t = −log σ(β·[w⁺_t·Δ⁺_t − w⁻_t·Δ⁻_t]), Δ_t = log π_θ(y_t) − log π_ref(y_t), averaged over every position
    (L159-164, L242; the weights pair the two sequences position by position). The weights: w⁻_t = 1 − s_t on the
    rejected solution (L138-139, L157), w⁺_t = 1 with the default `only_neg: True` (train_config.py L62, L148-149),
    else w⁺_t = s_t (L151-152). At the start of cDPO, π_θ = π_ref and every Δ_t = 0, so
        ∇ℓ_t = −(β/2)·[w⁺_t·∇log π_θ(y⁺_t) − w⁻_t·∇log π_θ(y⁻_t)]:
    the likelihood of each chosen token is raised with weight w⁺_t, that of each rejected token lowered with weight
    w⁻_t. As a priority over the two solutions as separate SFT examples, that is Φ = w⁺ on correct solutions and
    Φ = −w⁻ on incorrect ones, and with `negative_loss: ascent` the trainer's gradient is exactly cDPO's at its start
    (up to the constant β/2 and the normaliser, which AdamW's update does not see;
    tests/priorities/test_contrastive.py checks it against a transcription of `dpo_loss`). The direction: the more
    a rejected token is critical (s_t → 0), the harder it is unlearned; tokens the two models agree on (s_t → 1) are
    left alone, since they are not what made the solution wrong. With only_neg = False, a correct solution's tokens
    are weighted by how much the correct-solution model prefers them.

    Choices:
    - Negatives use the library's bounded unlikelihood −log(1 − p) by default; `negative_loss: ascent` is the first-
      order cDPO gradient. Away from its start, DPO's factor σ(−β·margin) damps a position once it is won; the
      bounded unlikelihood damps a token once it is unlikely, its analogue without a pair.
    - No pairing and no reference forward: each solution is its own example, each token counts once in the
      normaliser N (cDPO averages over the padded positions of the batch). The DPO β (0.1) is a gradient scale here,
      absorbed by the learning rate; the contrastive β = 1 is fixed in the column (`contrastive_token_scores(beta=)`).
    - `rejected_weight` (ours) scales the unlearning; 0 drops the incorrect solutions, leaving SFT on the correct ones
      (weighted by s_t with only_neg = False). s_t is clamped to [0, 1].
    - The official code scores the text without the end-of-sequence token that DPO appends and gives that token
      weight 1 on both sides (L132-139); here the end token is scored like every other token of the sequence the
      trainer sees, so the column is aligned token for token (the code's Qwen branch re-aligns by hand).
    - Against the position paper (Shen et al. 2026, arXiv 2602.01227, Table 1), which lists Critical Tokens among the
      positive hard selections, Φ = 1[L(y) − L(y without x) > δ]: a token kept when removing it changes the loss by
      more than δ (its counterfactual impact). This follows cDPO's own objective instead: signed, soft weights from
      contrastive estimation, negative on the critical tokens of incorrect solutions. The table's hard selection is
      offered as its own method, `critical_counterfactual`, on a `counterfactual_impact` column
      (`trl_priority.tools.token_scores.counterfactual_impact`, one forward per deleted token; not the paper's rollouts).
    """
    score = contrastive_score.clamp(0.0, 1.0)  # (B, T-1)
    learn = torch.ones_like(score) if only_neg else score  # (B, T-1)
    phi = torch.where(unlearn != 0, -rejected_weight * (1.0 - score), learn)  # (B, T-1)
    return phi * mask


register_data_statistic(
    "counterfactual_impact",
    level="token",
    hint="`critical_counterfactual` reads one counterfactual impact per token of `input_ids` (the value at i scores "
    "token i): compute the column once with `trl_priority.tools.token_scores.counterfactual_impact(model, dataset, "
    "tokenizer)` (the starting model), or `python -m trl_priority.tools.token_scores counterfactual --model M --dataset D "
    "--output OUT` and train on OUT (recipes/critical_counterfactual.yaml says how)",
)


def _oriented_impact(impact: torch.Tensor, direction: str) -> torch.Tensor:
    """The impact in the direction that counts as critical: "helps" as stored, "hurts" negated, "either" |impact|."""
    if direction == "hurts":
        return -impact
    return impact.abs() if direction == "either" else impact


def counterfactual_score(counterfactual_impact: torch.Tensor, mask: torch.Tensor, *, direction: str) -> torch.Tensor:
    """The selection score of `critical_counterfactual` with mode="top": the oriented impact; higher is kept."""
    return _oriented_impact(counterfactual_impact, direction) * mask  # (B, T-1)


def _counterfactual_kept_fraction(args: Mapping[str, Any], progress: float) -> float:
    return args["ratio"] if args["mode"] == "top" else 1.0


def _check_counterfactual_args(args: dict) -> None:
    if args["mode"] == "threshold" and args["scope"] != "micro_batch":
        raise PriorityError(
            f"priority_args for 'critical_counterfactual': scope={args['scope']!r} chooses where the top `ratio` is "
            "taken, which only mode='top' does; mode='threshold' compares each token with delta. Use "
            "scope='micro_batch'."
        )


@register_priority(
    regime="hard",
    paper="Lin et al. 2024, Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning "
    "Capability, arXiv 2411.19943 (ICML 2025), as the position paper's Table 1 writes it (Shen et al. 2026, "
    "arXiv 2602.01227)",
    selection=TopFraction(counterfactual_score, fraction=_counterfactual_kept_fraction, scope="scope"),
    validate=_check_counterfactual_args,
)
def critical_counterfactual(
    counterfactual_impact: torch.Tensor,
    selected: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: Literal["threshold", "top"] = "threshold",
    delta: float = 0.0,
    direction: Literal["helps", "hurts", "either"] = "helps",
    ratio: Fraction = 0.5,
    scope: Literal["micro_batch", "step", "example"] = "micro_batch",
) -> torch.Tensor:
    """Critical tokens by counterfactual impact: train only on the tokens whose deletion changes the loss of the rest.

    Paper: Lin, Liang, Xu, Liu, Wang, Luo, Shi, Li, Yang, Tu 2024, "Critical Tokens Matter: Token-Level Contrastive
    Estimation Enhances LLM's Reasoning Capability", arXiv 2411.19943 (ICML 2025), in the form the position paper
    gives it (Shen et al. 2026, "Token Priority", arXiv 2602.01227, Table 1: a positive hard selection with an
    intrinsic "counterfactual impact" signal, Φ = 1[L(y) − L(y without x) > δ]; section 5.1 describes it as keeping
    the tokens whose removal alters the loss significantly). The project's `critical` follows cDPO's own signed
    weights; this is the table's reading, a real alternative.

        impact_t = L(y without y_t) − L(y),  L = NLL of the completion tokens other than y_t
                                              (the `counterfactual_impact` column, computed once with the starting
                                              model by `trl_priority.tools.token_scores.counterfactual_impact`)
        mode="threshold" (default, the table):  Φ_t = 1[d(impact_t) > delta]                           delta = 0
        mode="top":                             Φ_t = 1[d(impact_t) among the top `ratio` of the supervised tokens]
                                                                                                        ratio = 0.5
        d = identity (direction="helps", default) | −impact ("hurts") | |impact| ("either")

    Φ is on the label of each position (the column's value at t + 1), and only on the completion: prompt tokens and
    the last completion token have impact 0 and are never kept at δ ≥ 0.

    Choices (ours: the table gives the indicator only, no δ, no L, no code):
    - L and the column: teacher-forced NLL of the other completion tokens, summed (reduction="sum", nats), with the
      token deleted from the sequence; `counterfactual_impact(reduction="mean")` divides by their number. The
      tokens before t cancel, so impact_t > 0 exactly when y_t makes the rest of the completion likelier. This is the
      table's loss difference, not the paper's rollouts: Lin et al. find critical tokens by sampling continuations
      from each prefix of an incorrect solution and checking their answers, and train with contrastive-estimation
      weights (`critical`).
    - direction="helps" (default) reads the table's L as the log-likelihood of the rest, so that Φ keeps the tokens
      the rest of the solution depends on (the "sparks" of a reasoning chain in the position paper's section 3.3).
      Read with L as the NLL, the table's literal sign keeps the tokens whose deletion makes the rest likelier,
      direction="hurts"; direction="either" keeps |impact_t| > δ, the prose's "alters the loss".
    - delta = 0 (ours, the table gives none): keep every token that helps at all; δ is in nats of the rest of the
      completion (per token with reduction="mean"). mode="top" replaces δ by a quantile, as Rho-1 and T-SHIRT do,
      so that the kept share does not depend on the impacts' scale; ties by position, at least one token kept.
      `scope` (mode="top" only) takes it over the micro-batch (default: the column is data, it costs nothing), the
      optimizer step ("step") or each example ("example").
    - The impacts are the scoring model's, fixed before training (a static mask, like T-SHIRT's); the loss is
      divided by all supervised tokens (N), masked ones included.
    """
    if mode == "top":
        return (selected & mask).float()  # (B, T-1)
    return ((_oriented_impact(counterfactual_impact, direction) > delta) & mask).float()  # (B, T-1)


register_data_statistic(
    "information_gain",
    level="token",
    hint="`tshirt` reads one information gain per token of `input_ids` (the value at i scores token i): compute the "
    "column once with `trl_priority.tools.token_scores.information_gain(model, dataset, tokenizer)` (the starting model), "
    "or `python -m trl_priority.tools.token_scores information-gain --model M --dataset D --output OUT` and train on OUT "
    "(recipes/tshirt.yaml says how)",
)


def informativeness(information_gain: torch.Tensor) -> torch.Tensor:
    """|Δ_t|: how much conditioning on the prompt changes the token's log-probability, either way."""
    return information_gain.abs()  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Fu, Hamman, Dutta 2025, T-SHIRT: Token-Selective Hierarchical Data Selection for Instruction Tuning, "
    "arXiv 2506.01317 (NeurIPS 2025)",
    selection=TopFraction(informativeness, fraction="ratio", scope="scope"),
)
def tshirt(
    selected: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: Fraction = 0.5,
    scope: Literal["micro_batch", "step"] = "micro_batch",
) -> torch.Tensor:
    """T-SHIRT's informative tokens as the mask: train only on the tokens whose prediction the prompt changes most.

    Paper: Fu, Hamman, Dutta 2025, "T-SHIRT: Token-Selective Hierarchical Data Selection for Instruction Tuning",
    arXiv 2506.01317 (NeurIPS 2025); official code github.com/Dynamite321/T-SHIRT (token_loss.py, compute_stat.py,
    tshirt_select.py, scripts/select_data.sh).

        Δ_t = log p(y_t | x, y_<t) − log p(y_t | y_<t)      (the `information_gain` column: the gain of the prompt x)
        Φ_t = 1[|Δ_t| is among the top k = round(ratio · n) of the n supervised tokens]     ratio = 0.5

    Compute the column once with `trl_priority.tools.token_scores.information_gain` (a forward with and one without the
    prompt; the starting model is the natural scorer). The official code computes `pmi = cond_loss − uncond_loss`
    (token_loss.py L117-137), the negative of Δ, and keeps the tokens with |pmi| above the (1 − ratio) percentile of
    every token's |pmi| (compute_stat.py L61, L69): the sign does not matter for the mask. ratio = 0.5 is
    select_data.sh's `--ratio 0.5` (compute_stat.py L98); the released subsets also use 0.75.

    How this differs from the paper: T-SHIRT selects *examples*, not tokens. It aggregates the kept tokens of each
    example into a score, S-IFD = exp(mean of pmi over the kept tokens) (compute_stat.py L66-75), computes it on 30
    copies of each example with NEFTune noise on the embeddings (α = 5, token_loss.py L97-114), keeps the 2k examples
    with the highest mean S-IFD and an IFD below 1, then the k of them with the smallest spread (tshirt_select.py
    L23-51), and fine-tunes on those k examples with plain SFT. Here every example trains, and the token mask that
    the paper uses inside its score is Φ itself: the token-selection half of T-SHIRT as a token priority. The noise
    copies serve the example-level robustness and are not used; Δ is the clean score.

    Choices:
    - The percentile is taken over the micro-batch (`scope="micro_batch"`, the default: the column is data, so the
      selection costs nothing) instead of the whole dataset; `scope="step"` takes it over every micro-batch of the
      optimizer step on every process, at the cost of one extra forward without gradient per micro-batch (the
      trainer's step-wide selection scores through the model). k = round(ratio · n), at least 1, ties broken by
      position; the code's strict `>` against an interpolated percentile keeps the same tokens when the values are
      distinct and ratio · n is whole.
    - No chunk level: the official code has none. Whole words or labelled spans are kept together with the
      config-level `priority_granularity: word` (or `span`) and `priority_pooling: max`.
    - The loss is divided by all supervised tokens (N), masked ones included.
    """
    return selected.float() * mask  # (B, T-1)
