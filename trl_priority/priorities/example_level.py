"""Example-level priorities: Φ(S), one value for every token of an example, from a score computed once, offline.

- `selectit`: the model's confidence in the example by self-reflection (SelectIT);
- `instruction_mining`: the example's influence on a validation set, by gradient similarity (Table 1's reading of
  Instruction Mining);
- `diq`: the high-difficulty ∩ high-influence quadrant (DIQ);
- `opencoder`: code that passes heuristic filters and a quality classifier (OpenCoder).

Four registered methods over two shared pure rules (`threshold_rule`, `top_fraction_rule`), not one method with four
recipes: the registry contract names a recipe after its method (`recipes/<method>.yaml`) and `trl-priority list` and
the README show one row per method with its paper and defaults; each method reads its own columns (a misnamed column is
an error naming the scorer that makes it), and each has defaults from its own paper (SelectIT's top 20%, Instruction
Mining's Infl > 0, DIQ's two median splits, OpenCoder's filters ∧ classifier). The shared part is the rule.

The scores are example-level data columns (one number per example, `trl_priority.statistics.register_data_statistic(
level="example")`), made by `trl_priority.tools.example_scores` (SelectIT, influence, DIQ) or `trl_priority.priorities.code_filters`
(OpenCoder's heuristics). Like RobustFT's `noise`, each is broadcast to the example's tokens before truncation and
packing, so Φ is exact under padding, padding-free and packing. A dataset-wide top fraction reads the companion
column `<score>_rank` (the share of the dataset scoring strictly higher, 0 for the best), since a priority sees one
batch at a time. Φ = 0 drops an example's tokens from the loss but not from N, the supervised-token count the loss
is divided by: the learning rate per kept token stays that of SFT, as everywhere in this package.
"""

from __future__ import annotations

from typing import Literal

import torch

from trl_priority.priorities.registry import Fraction, NonNegative, PriorityError, register_priority
from trl_priority.statistics import register_data_statistic


# Some of the hints run long: they say which function makes the column, so a missing column is fixed in one step.
_SCORER_HINT = "compute it once with `trl_priority.tools.example_scores.{fn}` or `python -m trl_priority.tools.example_scores {cmd}`"
for _name, _fn, _cmd in (
    ("selectit_score", "selectit_scores(models, tokenizer, dataset)", "selectit --model M --dataset D --output OUT"),
    ("influence", "influence_scores(model, tokenizer, train, validation)", "influence --model M --dataset D "
     "--validation V --output OUT"),
    ("diq_difficulty", "diq_scores(model, tokenizer, train, validation)", "diq --model M --dataset D --validation V "
     "--output OUT"),
):  # fmt: skip
    for _column in (_name, f"{_name.removesuffix('_score')}_rank"):
        register_data_statistic(
            _column,
            level="example",
            hint=f"one number per example in a '{_column}' column: " + _SCORER_HINT.format(fn=_fn, cmd=_cmd),
        )
register_data_statistic(
    "code_heuristics",
    level="example",
    hint="one number per example in a 'code_heuristics' column, 1 if the code passes OpenCoder's heuristic filters "
    "and 0 if not: compute it with `trl_priority.priorities.code_filters.with_heuristics(dataset)` (builtin:python-functions "
    "has it)",
)
register_data_statistic(
    "classifier",
    level="example",
    hint="one quality-classifier score per example in a 'classifier' column (your classifier's; "
    "`trl_priority.priorities.code_filters.with_proxy_classifier(dataset)` adds a rule-based stand-in, as "
    "builtin:python-functions does)",
)


# ------------------------------------------------------------------------------------------------------------------
# The shared rules: pure functions of a broadcast example-level score
# ------------------------------------------------------------------------------------------------------------------
def threshold_rule(score: torch.Tensor, threshold: float, temperature: float = 0.0) -> torch.Tensor:
    """1[score > threshold]; with temperature > 0 the soft form σ((score − threshold) / temperature)."""
    if temperature > 0:
        return torch.sigmoid((score - threshold) / temperature)  # (B, T-1)
    return (score > threshold).float()  # (B, T-1)


def top_fraction_rule(rank: torch.Tensor, fraction: float) -> torch.Tensor:
    """1[the example is in the dataset's top `fraction`]: fewer than `fraction` of the examples score higher.

    `rank` is float32 (e.g. 0.2 stored as 0.2000000030), so the comparison leaves a margin of 1e-6, far below the
    1/n between two ranks for any dataset of fewer than a million examples."""
    return (rank < fraction - 1e-6).float()  # (B, T-1)


def _check_selection(args: dict) -> None:
    if args["mode"] == "soft" and args["temperature"] <= 0:
        raise PriorityError(
            "priority_args: mode='soft' needs temperature > 0 (Φ = σ((score − threshold) / temperature)); "
            "temperature = 0 is the hard rule, mode='threshold'."
        )


def _select(score, rank, mask, mode, threshold, fraction, temperature) -> torch.Tensor:
    if mode == "top":
        phi = top_fraction_rule(rank, fraction)
    else:
        phi = threshold_rule(score, threshold, temperature if mode == "soft" else 0.0)
    return phi * mask  # (B, T-1)


# ------------------------------------------------------------------------------------------------------------------
# SelectIT
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="soft",
    paper="Liu et al. 2024, SelectIT: Selective Instruction Tuning for LLMs via Uncertainty-Aware Self-Reflection, "
    "NeurIPS 2024, arXiv 2402.16705",
    validate=_check_selection,
)
def selectit(
    selectit_score: torch.Tensor,
    selectit_rank: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: Literal["top", "threshold", "soft"] = "top",
    fraction: Fraction = 0.2,
    threshold: float = 0.0,
    temperature: NonNegative = 1.0,
) -> torch.Tensor:
    """SelectIT: train on the examples the model itself rates best, by uncertainty-aware self-reflection.

    Paper: Liu, Liu, Wong, Li, Wang, Hu, Zhang 2024, "SelectIT: Selective Instruction Tuning for LLMs via
    Uncertainty-Aware Self-Reflection", NeurIPS 2024, arXiv 2402.16705; code github.com/Blue-Raincoat/SelectIT
    (self_reflection/*.py). Position paper (arXiv 2602.01227) Table 1: Φ(x) = 𝕀[Confidence(x) via self-reflection > τ].

        S(e) = Σ_m w_m · mean_k S_tok(m, k, e) / (1 + α·std_k S_tok(m, k, e))    (the `selectit_score` column)
        Φ_t = 1[fewer than `fraction` of the dataset's examples have a higher S]   mode = "top", fraction = 0.2
        Φ_t = 1[S(e) > threshold]                                                   mode = "threshold"
        Φ_t = σ((S(e) − threshold) / temperature)                                   mode = "soft"

    for every token t of example e. S_tok is the token-level score of model m's next-token probabilities of the
    ratings 1..5 after the k-th rating prompt, α = 0.2, w_m ∝ model size (`trl_priority.tools.example_scores.
    selectit_scores`, which also writes `selectit_rank`). The default is the paper's selection: the top 20% of the
    dataset by S (`--proportion 0.2`). The Table's τ is `threshold` (S is on the rating scale times an uncertainty
    in [0, 1], so τ is data-dependent; the top fraction avoids choosing it).

    What the paper does and this does not: it fine-tunes on the selected 20% only (fewer steps); here every example
    stays in the data and the others get Φ = 0 (same data order, the same number of steps; the loss is divided by
    all supervised tokens). The paper's raters are LLaMA-2 7B/13B/70B; here any list of models sharing the
    tokenizer. Choices: the rating prompts are our own rewordings (the official ones are in its data/rating_prompt.txt);
    the official token level divides the spread by K − 1 with K the number of prompts, which equals R − 1 only for
    K = 5 prompts: here R − 1 (R = 5 ratings); the soft mode is ours. Ties at the cut are all kept.
    """
    return _select(selectit_score, selectit_rank, mask, mode, threshold, fraction, temperature)


# ------------------------------------------------------------------------------------------------------------------
# Instruction Mining (Table 1's influence reading)
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="soft",
    paper="Cao et al., Instruction Mining: Instruction Data Selection for Tuning Large Language Models, COLM 2024, "
    "arXiv 2307.06290 (Table 1's influence reading; influence as in LESS, Xia et al. 2024, arXiv 2402.04333)",
    validate=_check_selection,
)
def instruction_mining(
    influence: torch.Tensor,
    influence_rank: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: Literal["threshold", "top", "soft"] = "threshold",
    threshold: float = 0.0,
    fraction: Fraction = 0.05,
    temperature: NonNegative = 0.1,
) -> torch.Tensor:
    """Instruction Mining, as Table 1 reads it: keep the examples whose influence on a validation set is positive.

    Paper: Cao, Kang, Wang, Sun, "Instruction Mining: Instruction Data Selection for Tuning Large Language Models",
    COLM 2024, arXiv 2307.06290. Position paper (arXiv 2602.01227) Table 1: Φ(S) = 𝕀[Infl(S, D_val) > 0].
    Influence as current practice computes it at scale: LESS (Xia et al. 2024, arXiv 2402.04333) and TracIn (Pruthi
    et al. 2020, arXiv 2002.08484).

        Infl(e) = mean_{v ∈ D_val} cos(P^T ∇L(e), P^T ∇L(v))    (the `influence` column; LoRA gradients, P random)
        Φ_t = 1[Infl(e) > threshold]                  mode = "threshold", threshold = 0 (the Table's rule)
        Φ_t = 1[e in the dataset's top `fraction`]    mode = "top", fraction = 0.05 (LESS's 5%)
        Φ_t = σ((Infl(e) − threshold) / temperature)  mode = "soft", temperature = 0.1 (a cosine is in [−1, 1])

    for every token t of example e. Compute the column once with `trl_priority.tools.example_scores.influence_scores(model,
    tokenizer, train, validation)` on the validation set you name. Infl > 0: one gradient step on e lowers the
    validation loss, to first order.

    Honestly, what Instruction Mining itself does is different: it fits a linear rule that predicts a model's
    validation loss (inference loss on an evaluation set) from indicator features of the data (reward-model score,
    UniEval naturalness and understandability, length, perplexity, KNN-6 distance), then uses it to rank data
    subsets and searches the best subset size with BlendSearch. Only the position paper's reading, selection by
    influence on a validation set, is implemented here; the indicator regression is not. Choices: one checkpoint,
    SGD (not Adam-preconditioned) gradients, the mean over the validation examples (LESS takes the max over tasks),
    projection d = 8192; every example stays in the data with Φ = 0 if dropped (the loss is divided by all
    supervised tokens).
    """
    return _select(influence, influence_rank, mask, mode, threshold, fraction, temperature)


# ------------------------------------------------------------------------------------------------------------------
# DIQ
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="hard",
    paper="Zhuang et al. 2025, Towards Efficient Medical Reasoning with Minimal Fine-Tuning Data (DIQ: "
    "Difficulty-Influence Quadrant), arXiv 2508.01450",
)
def diq(
    diq_difficulty_rank: torch.Tensor,
    influence_rank: torch.Tensor,
    mask: torch.Tensor,
    *,
    difficulty_fraction: Fraction = 0.5,
    influence_fraction: Fraction = 0.5,
) -> torch.Tensor:
    """DIQ: keep the examples in the high-difficulty, high-influence quadrant.

    Paper: Zhuang, Tang, Yang, Liu, Hu, Li, Xue, He, Ge, Li, Qian, Razzak 2025, "Towards Efficient Medical Reasoning
    with Minimal Fine-Tuning Data", arXiv 2508.01450; code github.com/mihara-bot/DIQ (read: the arXiv abstract and
    summaries of its method; not the full text or the code). Position paper (arXiv 2602.01227) Table 1:
    Φ(S) = 𝕀[S ∈ HighDiff ∩ HighInfl].

        HighDiff = the top `difficulty_fraction` of the dataset by difficulty  (the model's loss on the example)
        HighInfl = the top `influence_fraction` of the dataset by influence    (gradient dot product with D_val)
        Φ_t = 1[e ∈ HighDiff ∩ HighInfl]        difficulty_fraction = influence_fraction = 0.5 (median splits)

    for every token t of example e, from the columns `diq_difficulty_rank` and `influence_rank` that
    `trl_priority.tools.example_scores.diq_scores(model, tokenizer, train, validation)` computes in one pass.

    What the paper does and this does not: its difficulty is model-agnostic, a BiomedBERT classifier's 5-level
    Likert rating of knowledge and reasoning complexity; here the model's own mean NLL stands in (no such classifier
    for general data). Its influence is a gradient dot product with a small validation set, as here. It fine-tunes
    on a budget (1% or 10% of the data) taken from the quadrant; here the quadrant is cut at quantiles (our
    defaults: the medians, which keep about a quarter of the data if the two axes are independent; 0.1 and 0.1 keep
    about 1%), and dropped examples stay with Φ = 0 (the loss is divided by all supervised tokens).
    """
    return (
        top_fraction_rule(diq_difficulty_rank, difficulty_fraction)
        * top_fraction_rule(influence_rank, influence_fraction)
        * mask
    )  # (B, T-1)


# ------------------------------------------------------------------------------------------------------------------
# OpenCoder
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="hard",
    paper="Huang et al. 2025, OpenCoder: The Open Cookbook for Top-Tier Code Large Language Models, ACL 2025, "
    "arXiv 2411.04905",
)
def opencoder(
    code_heuristics: torch.Tensor, classifier: torch.Tensor, mask: torch.Tensor, *, threshold: float = 0.5
) -> torch.Tensor:
    """OpenCoder: keep the code that passes the heuristic filters and that a quality classifier scores above τ.

    Paper: Huang, Cheng, Liu, Xu, Hao, Song, Xu, Yang, Liu, Zhang, et al. 2025, "OpenCoder: The Open Cookbook for
    Top-Tier Code Large Language Models", ACL 2025, arXiv 2411.04905 (read: the abstract and section list; the
    filtering rules as summarised in public write-ups of its appendix A). Position paper (arXiv 2602.01227) Table 1:
    Φ(x) = 𝕀[Passes Heuristics ∧ Classifier > τ].

        Φ_t = 1[code_heuristics(e) ≠ 0] · 1[classifier(e) > threshold]        threshold τ = 0.5

    for every token t of example e. `code_heuristics` is 1 when the example's code passes every filter of the
    registry in `trl_priority.priorities.code_filters` (`with_heuristics(dataset)` computes it; `register_filter` adds one),
    `classifier` a quality classifier's score given in the data (a probability: τ = 0.5 is its decision boundary).

    What the paper does and this does not: OpenCoder cleans its pre-training corpus (RefineCode) with more than a
    hundred heuristic rules in three tiers (natural-language, general-code and language-specific) after
    deduplication, and recalls code-related web text with fastText classifiers; it selects data, it does not weight
    tokens. Here a documented subset of general-code and Python rules is implemented (`code_filters.FILTERS`), the
    classifier is whatever the data brings (builtin:python-functions ships a rule-based stand-in, not a trained
    classifier), and failing examples stay in the data with Φ = 0 (the loss is divided by all supervised tokens).
    """
    return ((code_heuristics != 0) & (classifier > threshold)).float() * mask  # (B, T-1)
