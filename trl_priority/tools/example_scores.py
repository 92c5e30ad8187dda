"""Offline per-example scores: one number per example, computed once with models, read by example-level priorities.

Some methods of the position paper's Table 1 (arXiv 2602.01227) decide about whole examples, Φ(S): a score is computed
once per example before training, and the priority keeps (or weights) every token of an example by it. Their scores
need forwards and backwards the training pass does not make (rating prompts, per-example gradients), so they are
computed here and stored as example-level columns, which travel through truncation, padding-free and packing like
RobustFT's `noise` column (`trl_priority.data.columns`):

| function           | columns                                                   | read by              |
|--------------------|-----------------------------------------------------------|----------------------|
| `selectit_scores`  | `selectit_score`, `selectit_rank`                         | `selectit`           |
| `influence_scores` | `influence`, `influence_rank`                             | `instruction_mining` |
| `diq_scores`       | `diq_difficulty(_rank)`, `influence(_rank)` (dot product) | `diq`                |

Each rank column (`selectit_rank`, `influence_rank`, `diq_difficulty_rank`) is the share of the dataset's examples
that score strictly higher (`share_ahead`): 0 for the best example. A priority keeps "the top fraction f of the
dataset" as `rank < f`, a dataset-wide selection that a priority, which sees one batch at a time, could not make
from the score alone.

Each function takes a `datasets.Dataset` as the trainer accepts it (prompt-completion, conversational or not, or
`messages`) and returns the same dataset with the new columns; rows are tokenized like the trainer tokenizes them
(`trl_priority.tools.scoring_io.tokenize_like_trainer`), and an example's loss is the mean NLL of the tokens the trainer
would supervise (the completion; every token of a plain-text row).

From the command line (writes `<output>/train.jsonl`, loadable as `--dataset_name <output>`):

    python -m trl_priority.tools.example_scores selectit --model builtin:smollm2-135m-instruct --dataset builtin:gsm8k \
        --output data/selectit
    python -m trl_priority.tools.example_scores influence --model M --dataset builtin:gsm8k \
        --validation builtin:gsm8k-noisy --output data/instruction_mining

Why one module of ~500 lines: the three scorers above are one table, and they share what makes their columns
usable by a priority: the rank convention (`share_ahead`, `with_score_and_rank`), the target positions the loss is
taken over, and one command line. SelectIT (~130 lines) and influence/DIQ (~180 lines) are each too small to stand
alone, and `diq_scores` reuses the influence pass. What they share with `trl_priority.tools.token_scores` (the
trainer's tokenization, model and dataset loading) is `trl_priority.tools.scoring_io`.
"""

from __future__ import annotations

import argparse
import bisect
import math
import statistics as pystats
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset

from trl_priority.references.sources import eval_mode
from trl_priority.tools.scoring_io import (
    device_of,
    load_dataset,
    load_model,
    pad_token_id,
    right_padded_logits,
    tokenize_like_trainer,
    with_column,
    write_scored,
)


# ------------------------------------------------------------------------------------------------------------------
# Shared: dataset-wide ranks, the text of an example, its target positions
# ------------------------------------------------------------------------------------------------------------------
def share_ahead(scores: Sequence[float]) -> list[float]:
    """For each example, the share of all examples whose score is strictly higher: 0 for the best, ties share a rank.

    `rank < f` keeps the top fraction f of the dataset (ties at the cut are all kept or all dropped)."""
    ordered = sorted(scores)
    n = len(ordered)
    return [(n - bisect.bisect_right(ordered, score)) / n for score in scores]


def rank_column_of(column: str) -> str:
    """The rank column that goes with a score column: `selectit_score` → `selectit_rank`, `influence` →
    `influence_rank`."""
    return f"{column.removesuffix('_score')}_rank"


def with_score_and_rank(dataset: Dataset, column: str, scores: Sequence[float]) -> Dataset:
    """`dataset` with the example-level column `column` and its dataset-wide rank (`rank_column_of(column)`)."""
    scores = [float(score) for score in scores]
    if not all(math.isfinite(score) for score in scores):
        raise ValueError(f"Column '{column}': some scores are not finite; check the scoring model and the data.")
    return with_column(with_column(dataset, column, scores), rank_column_of(column), share_ahead(scores))


def _message_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(message["content"] for message in value)


def instruction_and_response(row: Mapping[str, Any]) -> tuple[str, str]:
    """The instruction and the response of a raw row, as plain text (message contents joined by newlines)."""
    if "prompt" in row and "completion" in row:
        return _message_text(row["prompt"]), _message_text(row["completion"])
    if "messages" in row:
        messages = list(row["messages"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("A `messages` row has no assistant message to rate.")
        return _message_text(messages[:last]), messages[last]["content"]
    raise ValueError(
        "Rating an example needs its instruction and its response apart: give a prompt-completion dataset ('prompt' "
        "and 'completion' columns) or a conversational one ('messages'); a plain 'text' row has no response to rate."
    )


def target_positions(row: Mapping[str, Any]) -> list[int]:
    """Positions i ≥ 1 of the tokens the trainer supervises: the completion, else the labels, else every token."""
    if "completion_mask" in row:
        where = [i for i, bit in enumerate(row["completion_mask"]) if bit]
    elif "labels" in row:
        where = [i for i, label in enumerate(row["labels"]) if label != -100]
    else:
        where = list(range(len(row["input_ids"])))
    return [i for i in where if i >= 1]


# ------------------------------------------------------------------------------------------------------------------
# SelectIT: uncertainty-aware self-reflection
# ------------------------------------------------------------------------------------------------------------------
RATING_PROMPTS = (
    "Rate the response below from 1 to 5 for how accurately it follows the instruction. Answer with the score alone.",
    "On a scale of 1 to 5, where 5 is best, how correct and complete is this response to the instruction? Give "
    "only the number.",
    "Give the response a score between 1 and 5 for how faithfully it carries out the instruction; reply with one "
    "digit.",
    "How well does the response answer the instruction? Score it from 1 (poorly) to 5 (perfectly), number only.",
    "Judge the accuracy of the response to the instruction on a 1-5 scale and write the score by itself.",
)
RATING_TEMPLATE = "{prompt}\nInstruction: {instruction}\nResponse: {response}\nThe score is: "


def rating_token_ids(tokenizer, ratings: Sequence[int]) -> list[int]:
    """The token id of each rating, as the model would write it after the rating prompt (one token per digit)."""
    ids = []
    for rating in ratings:
        encoded = tokenizer.encode(str(rating), add_special_tokens=False)
        if not encoded or tokenizer.decode(encoded[-1:]).strip() != str(rating):
            raise ValueError(
                f"The tokenizer has no single token for the rating {rating!r} (it encodes it as {encoded}); SelectIT "
                "reads the next-token probability of each rating, so each must be one token. Use ratings 1-9."
            )
        ids.append(encoded[-1])
    return ids


def selectit_token_score(
    probabilities: Sequence[float], ratings: Sequence[int], rule: Literal["paper", "expected"] = "paper"
) -> float:
    """SelectIT's token-level score from the next-token probabilities of the ratings (any scale: renormalised here).

    paper:    P'_r = P_r / Σ P;  S = r* · (1/(R−1)) Σ_r (P'_r* − P'_r),  r* = argmax_r P'_r
    expected: S = Σ_r r · P'_r (the probability-weighted expected rating)
    """
    total = sum(probabilities)
    normalised = [p / total for p in probabilities]
    if rule == "expected":
        return sum(r * p for r, p in zip(ratings, normalised))
    best = max(range(len(ratings)), key=lambda i: normalised[i])
    spread = sum(normalised[best] - p for p in normalised) / (len(ratings) - 1)
    return ratings[best] * spread


def selectit_sentence_score(token_scores: Sequence[float], alpha: float) -> float:
    """Mean over the rating prompts, penalised by their spread: mean / (1 + α·std) (population std)."""
    return pystats.fmean(token_scores) / (1 + alpha * pystats.pstdev(token_scores))


@torch.no_grad()
def _last_token_probabilities(
    model, sequences: Sequence[list[int]], pad_id: int, token_ids: list[int]
) -> torch.Tensor:
    """`(B, R)` next-token probabilities of `token_ids` after the last token of each right-padded sequence."""
    device = device_of(model)
    logits = right_padded_logits(model, list(sequences), pad_id)  # (B, L, V)
    last = torch.tensor([len(ids) - 1 for ids in sequences], device=device)  # (B,)
    probs = logits[torch.arange(len(sequences), device=device), last].float().softmax(-1)  # (B, V)
    return probs[:, token_ids].cpu()  # (B, R)


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def selectit_scores(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    tokenizer,
    dataset: Dataset,
    *,
    prompts: Sequence[str] = RATING_PROMPTS,
    alpha: float = 0.2,
    ratings: Sequence[int] = (1, 2, 3, 4, 5),
    weights: Sequence[float] | None = None,
    token_rule: Literal["paper", "expected"] = "paper",
    column: str = "selectit_score",
    batch_size: int = 8,
) -> Dataset:
    """SelectIT's self-reflection score of each example (Liu et al. 2024, NeurIPS, arXiv 2402.16705).

    Each model m rates each example with each of the K rating prompts (`RATING_TEMPLATE`: the prompt, the example's
    instruction and response, then "The score is: "); P_r is the next-token probability of the rating r ∈ 1..5.

        token level     S_tok(m, k) = r*·(1/(R−1))·Σ_r (P'_r* − P'_r),   P' = P / ΣP,  r* = argmax P'   (`token_rule`)
        sentence level  S_sent(m) = mean_k S_tok / (1 + α·std_k S_tok),    α = 0.2 (the official default)
        model level     S = Σ_m w_m·S_sent(m),   w_m = θ_m / Σθ (θ: parameter counts), or `weights` normalised

    `token_rule="expected"` replaces the token level by the expected rating Σ_r r·P'_r (smoother; not the paper's).
    The paper rates with LLaMA-2 7B, 13B and 70B and keeps the top 20% by S; the prompts here are our own five
    rewordings of the task (the official file has nine, of which the code uses the first K), since they must match
    the scale `ratings`. The models must share `tokenizer`. Returns `dataset` with `column` and its rank column.
    """
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not models or not prompts:
        raise ValueError("selectit_scores needs at least one model and one rating prompt.")
    if weights is None:
        weights = [_parameter_count(model) for model in models]
    if len(weights) != len(models) or sum(weights) <= 0:
        raise ValueError(f"`weights` needs one positive number per model ({len(models)}), got {list(weights)}.")
    shares = [w / sum(weights) for w in weights]
    token_ids = rating_token_ids(tokenizer, ratings)
    texts = [
        RATING_TEMPLATE.format(prompt=prompt, instruction=instruction, response=response)
        for instruction, response in map(instruction_and_response, dataset)
        for prompt in prompts
    ]  # example-major: the K prompts of example 0, then of example 1, ...
    sequences = [tokenizer(text)["input_ids"] for text in texts]
    pad_id, k = pad_token_id(tokenizer), len(prompts)
    total = [0.0] * len(dataset)
    for model, share in zip(models, shares):
        with eval_mode(model):
            probs = torch.cat(
                [
                    _last_token_probabilities(model, sequences[i : i + batch_size], pad_id, token_ids)
                    for i in range(0, len(sequences), batch_size)
                ]
            )  # (N·K, R)
        token_scores = [selectit_token_score(row, list(ratings), token_rule) for row in probs.double().tolist()]
        for e in range(len(dataset)):
            total[e] += share * selectit_sentence_score(token_scores[e * k : (e + 1) * k], alpha)
    return with_score_and_rank(dataset, column, total)


# ------------------------------------------------------------------------------------------------------------------
# Influence: gradient similarity of (LoRA) gradients, randomly projected (LESS, TracIn)
# ------------------------------------------------------------------------------------------------------------------
PROJECTION_BLOCK = 1 << 14  # rows of the projection generated at once: the matrix is never held whole


def projection_block(
    seed: int, block: int, rows: int, dim: int, kind: Literal["rademacher", "gaussian"] = "rademacher"
) -> torch.Tensor:
    """Rows `block·PROJECTION_BLOCK …` of the fixed random projection `(n_params, dim)`, scaled by 1/√dim so that
    E‖P^T g‖² = ‖g‖². Each block has its own generator, seeded from (seed, block): the same matrix on every call,
    whatever the batch, without holding n_params × dim numbers."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, dim), generator=generator, dtype=torch.int8)
        return (signs.float() * 2 - 1) / math.sqrt(dim)  # (rows, dim)
    if kind == "gaussian":
        return torch.randn(rows, dim, generator=generator) / math.sqrt(dim)  # (rows, dim)
    raise ValueError(f"projection must be 'rademacher' or 'gaussian', got {kind!r}.")


def project(gradients: torch.Tensor, dim: int | None, seed: int, kind: str = "rademacher") -> torch.Tensor:
    """`(n, n_params)` gradients → `(n, dim)`, block by block of parameters; `dim=None`: unchanged."""
    if dim is None:
        return gradients
    out = torch.zeros(gradients.shape[0], dim, dtype=torch.float32)  # (n, dim)
    for block, start in enumerate(range(0, gradients.shape[1], PROJECTION_BLOCK)):
        chunk = gradients[:, start : start + PROJECTION_BLOCK].float().cpu()  # (n, rows)
        out += chunk @ projection_block(seed, block, chunk.shape[1], dim, kind)  # (n, dim)
    return out


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that training would change: the LoRA adapter's under PEFT, every parameter otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameter to take gradients of. Give the model you will fine-tune: a PEFT "
            "model with its LoRA adapter (LESS's setting), or a model whose parameters require grad."
        )
    return params


def example_loss(model: torch.nn.Module, input_ids: list[int], targets: list[int]) -> torch.Tensor:
    """Mean NLL of the tokens at `targets` (each predicted from the tokens before it): a scalar with gradient."""
    device = device_of(model)
    ids = torch.tensor([input_ids], device=device)  # (1, L)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()  # (L, V)
    where = torch.tensor(targets, device=device)  # (n,)
    logps = logits[where - 1].log_softmax(-1).gather(-1, ids[0, where][:, None]).squeeze(-1)  # (n,)
    return -logps.mean()


def example_gradients(
    model: torch.nn.Module, tokenizer, dataset: Dataset, *, args: Any = None, chunk: int = 16, **projection
) -> Iterator[tuple[list[float], torch.Tensor]]:
    """Per example, in order: its loss and its flattened gradient w.r.t. the trainable parameters, projected
    (`project(..., **projection)`). Yields `(losses, (n, dim) gradients)` per chunk of examples."""
    rows = tokenize_like_trainer(dataset, tokenizer, args)
    params = trainable_parameters(model)
    with eval_mode(model):  # no dropout: the gradient of the loss the model defines, not of one noisy draw
        for start in range(0, len(rows), chunk):
            losses, flat = [], []
            for row in rows.select(range(start, min(start + chunk, len(rows)))):
                targets = target_positions(row)
                if not targets:
                    raise ValueError(f"Example {start + len(flat)} has no supervised token to take a gradient of.")
                loss = example_loss(model, list(row["input_ids"]), targets)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                flat.append(
                    torch.cat(
                        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
                    )
                )
                losses.append(float(loss.detach()))
            yield losses, project(torch.stack(flat), **projection)  # (n, dim)


def _gradient_matrix(model, tokenizer, dataset, args, chunk, **projection) -> tuple[list[float], torch.Tensor]:
    losses, blocks = [], []
    for chunk_losses, block in example_gradients(model, tokenizer, dataset, args=args, chunk=chunk, **projection):
        losses += chunk_losses
        blocks.append(block)
    return losses, torch.cat(blocks).double()  # (n, dim)


def gradient_influence(
    train_gradients: torch.Tensor, validation_gradients: torch.Tensor, similarity: Literal["cosine", "dot"]
) -> torch.Tensor:
    """`(n_train,)`: the mean similarity of each train gradient with the validation gradients."""
    if similarity == "cosine":
        train_gradients = torch.nn.functional.normalize(train_gradients, dim=-1)
        validation_gradients = torch.nn.functional.normalize(validation_gradients, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}.")
    return (train_gradients @ validation_gradients.T).mean(-1)  # (n_train,)


def _influence_and_loss(model, tokenizer, train, validation, proj_dim, seed, projection, similarity, args, chunk):
    if len(validation) == 0:
        raise ValueError("The validation set is empty: influence is measured against the examples you name there.")
    settings = {"dim": proj_dim, "seed": seed, "kind": projection}
    losses, train_grads = _gradient_matrix(model, tokenizer, train, args, chunk, **settings)
    _, validation_grads = _gradient_matrix(model, tokenizer, validation, args, chunk, **settings)
    return gradient_influence(train_grads, validation_grads, similarity).tolist(), losses


def influence_scores(
    model: torch.nn.Module,
    tokenizer,
    train: Dataset,
    validation: Dataset,
    *,
    proj_dim: int | None = 8192,
    seed: int = 0,
    projection: Literal["rademacher", "gaussian"] = "rademacher",
    similarity: Literal["cosine", "dot"] = "cosine",
    column: str = "influence",
    args: Any = None,
    chunk: int = 64,
) -> Dataset:
    """The influence of each training example on a validation set, by gradient similarity (LESS / TracIn).

        g_e = P^T ∇_θ L(e),   L(e) = mean NLL of e's supervised tokens,  θ = the trainable (LoRA) parameters
        Infl(e, D_val) = (1/|D_val|) Σ_{v ∈ D_val} cos(g_e, g_v)       (`similarity="dot"`: ⟨g_e, g_v⟩)

    P is a fixed random projection `(n_params, proj_dim)` (Rademacher, or Gaussian, entries ±1/√d; seeded by `seed`;
    `proj_dim=None`: the exact gradients). This is the first-order influence of one SGD step on e on the validation
    loss (TracIn, Pruthi et al. 2020, at one checkpoint), in LESS's form (Xia et al. 2024, arXiv 2402.04333): LoRA
    gradients, random projection (LESS: d = 8192), cosine, mean over the validation examples. Infl > 0: a step on e
    lowers the validation loss, to first order.

    What LESS does and this does not: LESS sums over four checkpoints of a warm-up LoRA run (weighted by their
    learning rates), uses Adam-preconditioned training gradients, and takes the max over several validation tasks;
    here the gradients are plain SGD gradients at the model you pass (warm it up first for LESS's setting: a fresh
    LoRA adapter has B = 0, so the gradients w.r.t. A vanish) against one validation set. Gradients are taken one
    example at a time (no padding enters them), in eval mode.

    Cost: one forward and backward per example, and the projection regenerated once per `chunk` examples (it is
    never held whole: n_params × proj_dim numbers, 20·10⁹ for a rank-8 LoRA of a 135M model at d = 8192), so a larger
    `chunk` is faster and holds chunk × n_params gradient numbers. The matrix is generated on the CPU, so the same
    seed gives the same scores on any device. Returns `train` with `column` and its rank column.
    """
    influence, _ = _influence_and_loss(
        model, tokenizer, train, validation, proj_dim, seed, projection, similarity, args, chunk
    )
    return with_score_and_rank(train, column, influence)


def diq_scores(
    model: torch.nn.Module,
    tokenizer,
    train: Dataset,
    validation: Dataset,
    *,
    proj_dim: int | None = 8192,
    seed: int = 0,
    projection: Literal["rademacher", "gaussian"] = "rademacher",
    similarity: Literal["cosine", "dot"] = "dot",
    args: Any = None,
    chunk: int = 64,
) -> Dataset:
    """DIQ's two axes for each training example (Zhuang et al. 2025, arXiv 2508.01450): difficulty and influence.

        difficulty(e) = L(e), the model's mean NLL on e's supervised tokens        → `diq_difficulty(_rank)`
        influence(e)  = (1/|D_val|) Σ_v ⟨g_e, g_v⟩  (`influence_scores`, dot product by default, as DIQ's "Dot")
                                                                                   → `influence(_rank)`

    One pass: the loss whose gradient gives the influence is the difficulty. DIQ itself predicts difficulty with a
    BiomedBERT classifier trained to a 5-level Likert scale of knowledge and reasoning complexity (model-agnostic);
    without such a classifier the model's own loss stands in (the Table's "HighDiff"). Returns `train` with the four
    columns.
    """
    influence, losses = _influence_and_loss(
        model, tokenizer, train, validation, proj_dim, seed, projection, similarity, args, chunk
    )
    return with_score_and_rank(with_score_and_rank(train, "diq_difficulty", losses), "influence", influence)


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> Path:
    """Score a dataset and write it, with its new columns, to `<output>/train.jsonl`; returns that path."""
    from transformers import AutoTokenizer

    from trl_priority.tools.builtin import resolve_model

    parser = argparse.ArgumentParser(
        prog="python -m trl_priority.tools.example_scores", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    selectit = commands.add_parser("selectit", help="selectit_score for `selectit`")
    selectit.add_argument("--model", required=True, nargs="+", help="one or more rating models (same tokenizer)")
    selectit.add_argument("--alpha", type=float, default=0.2)
    selectit.add_argument("--token_rule", choices=["paper", "expected"], default="paper")
    gradient_commands = []
    for name, help_text in (
        ("influence", "influence for `instruction_mining`"),
        ("diq", "difficulty and influence for `diq`"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--model", required=True, help="the model to fine-tune (LoRA gradients with --lora_r)")
        command.add_argument(
            "--validation", required=True, help="the validation set: builtin:<name>, hub id or folder"
        )
        command.add_argument("--validation_limit", type=int, default=None, help="use only its first N examples")
        command.add_argument("--lora_r", type=int, default=8, help="take gradients w.r.t. a LoRA adapter of this rank")
        command.add_argument("--proj_dim", type=int, default=8192)
        command.add_argument("--seed", type=int, default=0)
        gradient_commands.append(command)
    for command in (selectit, *gradient_commands):
        command.add_argument("--dataset", required=True, help="builtin:<name>, a hub id or a local folder")
        command.add_argument("--output", required=True, help="folder to write train.jsonl into")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(argv)

    dataset = load_dataset(options.dataset)
    models = options.model if isinstance(options.model, list) else [options.model]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(models[0]))
    if options.command == "selectit":
        loaded = [load_model(path, options.device) for path in models]
        dataset = selectit_scores(loaded, tokenizer, dataset, alpha=options.alpha, token_rule=options.token_rule)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            load_model(models[0], options.device), LoraConfig(r=options.lora_r, target_modules="all-linear")
        )
        validation = load_dataset(options.validation)
        if options.validation_limit is not None:
            validation = validation.select(range(min(options.validation_limit, len(validation))))
        scorer = influence_scores if options.command == "influence" else diq_scores
        dataset = scorer(model, tokenizer, dataset, validation, proj_dim=options.proj_dim, seed=options.seed)
    return write_scored(dataset, options.output)


__all__ = [
    "RATING_PROMPTS",
    "RATING_TEMPLATE",
    "diq_scores",
    "gradient_influence",
    "influence_scores",
    "instruction_and_response",
    "main",
    "project",
    "projection_block",
    "selectit_scores",
    "selectit_sentence_score",
    "selectit_token_score",
    "share_ahead",
    "target_positions",
]


if __name__ == "__main__":
    main()
