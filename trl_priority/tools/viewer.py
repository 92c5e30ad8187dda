"""`trl-priority inspect`: see which tokens a recipe keeps, drops, down-weights or unlearns, before training.

    trl-priority inspect --config recipes/<method>.yaml --num-examples 3 [--output priorities.html] [--terminal]
    trl-priority inspect --compare recipes/a.yaml recipes/b.yaml --num-examples 3 [--output compare.html]

The recipe is parsed as `trl-priority sft` parses it (same parser, same checks, same overrides after it), and the
trainer is built as `trl_priority.scripts.sft` builds it (model, PEFT adapter, datasets, reference), without training.
For the first N prepared training rows, `PrioritySFTTrainer.token_statistics` gives every target token's Φ (exactly
`token_priorities`), the policy's probability of the observed token and, when the method reads a reference, the
reference's. The page also gives the target weight Q_y that Φ stands for (`target_weight`).

The target a weighted loss teaches. Let z be the logits at one position, p = softmax(z), y the observed token and
e_y its one-hot vector. Every token loss below has a gradient w.r.t. z of the form p − Q with Σ_v Q_v = 1: gradient
descent moves p towards Q, so Q is the target distribution the weighted loss teaches (arXiv 2606.11189 writes it
Q = p − g, g the logit gradient). Q_y, the target's weight on the observed token, says what Φ does to that token:
Q_y > p_y raises it, Q_y = p_y leaves it, Q_y < p_y lowers it.

- Φ ≥ 0, loss Φ·(−log p_y): ∂/∂z = Φ·(p − e_y) = p − Q with Q = Φ·e_y + (1 − Φ)·p, so
  Q_y = Φ + (1 − Φ)·p_y  (Φ = 0: Q_y = p_y, no change; Φ = 1: Q_y = 1, the one-hot target of SFT).
- Φ < 0 with `negative_loss="unlikelihood"` (the default), loss |Φ|·(−log(1 − p_y)): with ∂p_y/∂z = p_y·(e_y − p),
  ∂/∂z = |Φ|·p_y/(1 − p_y)·(e_y − p) = p − Q with Q = p + c·(p − e_y), c = |Φ|·p_y/(1 − p_y), so
  Q_y = p_y + c·(p_y − 1) = (1 − |Φ|)·p_y = (1 + Φ)·p_y  (Φ = −1: Q_y = 0, the token is pushed out entirely; the other
  tokens share its mass in proportion to p).
- Φ < 0 with `negative_loss="ascent"`, loss |Φ|·log p_y = Φ·(−log p_y): the Φ ≥ 0 case read with Φ < 0,
  Q = Φ·e_y + (1 − Φ)·p and Q_y = Φ + (1 − Φ)·p_y < 0 whenever p_y < 1: a target that is no distribution, which is
  why ascent is unbounded.

Q covers the Φ-weighted likelihood (`trl_priority.objectives.priority_loss`), per token; N, the loss's denominator,
scales every token's gradient alike and does not change Q. Terms a method adds to the loss (a KL anchor, a soft
target) move the target further; the page says when a method has such terms.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trl_priority.tools.render import render_html, render_terminal


PROGRESS_STEPS = 10_000  # `--progress p` is step round(p · 10000) of 10000


# ----------------------------------------------------------------------------------------------------------------
# The target Φ stands for
# ----------------------------------------------------------------------------------------------------------------
def target_weight(phi: torch.Tensor, logps: torch.Tensor, negative_loss: str = "unlikelihood") -> torch.Tensor:
    """Q_y, the weight of the observed token in the target distribution that the Φ-weighted loss teaches.

    Q_y = Φ + (1 − Φ)·p_y for Φ ≥ 0 (and for Φ < 0 with `negative_loss="ascent"`); Q_y = (1 + Φ)·p_y for Φ < 0 with
    `negative_loss="unlikelihood"`. Derivation in the module docstring; `target_distribution` gives the whole Q.

    Args:
        phi: Φ, any shape.
        logps: log p_y of the observed token, the shape of `phi`.
        negative_loss: the trainer's `negative_loss`.
    """
    p = logps.exp()
    likelihood = phi + (1 - phi) * p
    if negative_loss == "ascent":
        return likelihood
    return torch.where(phi < 0, (1 + phi) * p, likelihood)


def target_distribution(
    logits: torch.Tensor, labels: torch.Tensor, phi: torch.Tensor, negative_loss: str = "unlikelihood"
) -> torch.Tensor:
    """The whole target Q `(n, V)` of each position: the gradient of the position's weighted loss w.r.t. its logits is
    p − Q (module docstring). Q = Φ·e_y + (1 − Φ)·p, or, for Φ < 0 under unlikelihood, p + c·(p − e_y) with
    c = |Φ|·p_y/(1 − p_y).

    Args:
        logits: `(n, V)` logits.
        labels: `(n,)` observed tokens.
        phi: `(n,)` Φ.
        negative_loss: the trainer's `negative_loss`.
    """
    p = logits.float().softmax(-1)  # (n, V)
    onehot = torch.nn.functional.one_hot(labels, p.size(-1)).to(p.dtype)  # (n, V)
    phi = phi.to(p.dtype)[:, None]  # (n, 1)
    likelihood = phi * onehot + (1 - phi) * p  # (n, V)
    if negative_loss == "ascent":
        return likelihood
    p_y = p.gather(-1, labels[:, None])  # (n, 1)
    c = -phi * p_y / (1 - p_y)  # (n, 1): |Φ|·p_y/(1 − p_y) where Φ < 0
    return torch.where(phi < 0, p + c * (p - onehot), likelihood)


# ----------------------------------------------------------------------------------------------------------------
# One recipe's priorities on N examples
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One prepared training row: its tokens and, for each target position t (scoring token t + 1), the values."""

    tokens: list[str]  # (L,) decoded one by one
    input_ids: list[int]  # (L,)
    mask: list[bool]  # (L-1,) supervised
    phi: list[float]  # (L-1,)
    q: list[float]  # (L-1,)
    p: list[float]  # (L-1,) policy probability of the observed token
    p_ref: list[float] | None  # (L-1,) reference probability, when the method reads a reference

    def supervised(self) -> list[float]:
        return [phi for phi, m in zip(self.phi, self.mask) if m]


@dataclass
class Inspection:
    """What the page shows for one recipe."""

    recipe: str
    method: str
    priority_args: dict[str, Any]
    reference: str
    negative_loss: str
    model: str
    dataset: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    vocabulary: dict[str, int] = field(default_factory=dict, repr=False)


def parse_recipe(argv: list[str], prog: str = "trl-priority inspect"):
    """`(script_args, training_args, model_args, dataset_args)` from `--config <recipe> [--key value ...]`, parsed as
    `trl-priority sft` parses them: a misspelt key is named with the closest valid one; `accelerate launch` settings
    are accepted and have no effect here."""
    from accelerate.commands.launch import launch_command_parser

    from trl_priority.scripts import sft
    from trl_priority.tools.cli import _check_unknown_settings

    parser = sft.make_parser(prog=prog)  # a fresh parser per recipe: the recipe's values become its defaults
    *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    _check_unknown_settings(parser, launch_command_parser(), config_remaining, cli_remaining, command="inspect")
    return tuple(parsed)


def build_inspection_trainer(parsed, scratch_dir: str):
    """The recipe's trainer, built by `trl_priority.scripts.sft.build_trainer`; it never trains, logs or saves, so its
    output folder is a scratch one (the trainer creates it) and nothing is reported or pushed."""
    from trl_priority.scripts import sft

    script_args, training_args, model_args, dataset_args = parsed
    training_args.output_dir = scratch_dir
    training_args.report_to = []
    training_args.push_to_hub = False
    return sft.build_trainer(script_args, training_args, model_args, dataset_args)


def inspect_trainer(
    trainer, rows: list[dict[str, Any]], recipe: str = "", model: str = "", dataset: str = "", progress: float = 0.0
) -> Inspection:
    """An `Inspection` of prepared rows of `trainer`'s dataset: Φ, Q_y, p and p_ref for every target token, in one
    batch (so a selection is made over these rows, as `token_priorities(rows)` makes it).

    `progress` (in [0, 1]) sets the training progress that schedules, warm-up and curricula read
    (`global_step / max_steps`); the model stays the starting one.
    """
    if not 0 <= progress <= 1:
        raise ValueError(f"progress={progress} must be in [0, 1]: the fraction of training done.")
    if progress > 0:
        trainer.state.max_steps = PROGRESS_STEPS
        trainer.state.global_step = round(progress * PROGRESS_STEPS)
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    statistics = trainer.token_statistics(rows)
    negative_loss = trainer.args.negative_loss
    phi = statistics["phi"].float().cpu() + 0.0  # (B, T-1); + 0.0 turns a −0 (a schedule at 0) into 0
    mask, logps = statistics["mask"].cpu(), statistics["logps"].float().cpu()
    ref_logps = statistics.get("ref_logps")
    ref_logps = None if ref_logps is None else ref_logps.float().cpu()
    q = target_weight(phi, logps, negative_loss)  # (B, T-1)
    inspected = []
    for i, row in enumerate(rows):
        ids = list(row["input_ids"])
        n = len(ids) - 1  # target positions of this row; the batch pads the others
        supervised = mask[i, :n]
        inspected.append(
            Row(
                tokens=[tokenizer.decode([token], clean_up_tokenization_spaces=False) for token in ids],
                input_ids=ids,
                mask=supervised.tolist(),
                phi=phi[i, :n].tolist(),
                q=q[i, :n].tolist(),
                p=logps[i, :n].exp().tolist(),
                p_ref=None if ref_logps is None else ref_logps[i, :n].exp().tolist(),
            )
        )
    priority = trainer.priority
    method = "none (SFTTrainer)" if priority is None else priority.name
    # Where the reference statistics come from, as the run plan decided (`trainer.plan.reference_kind`)
    reference = (
        trainer.reference.description
        if trainer.plan.reference_kind != "none" and trainer.reference is not None
        else "none: the method reads no reference statistics"
    )
    return Inspection(
        recipe=recipe,
        method=method,
        priority_args=dict(trainer.priority_args),
        reference=reference,
        negative_loss=negative_loss,
        model=model,
        dataset=dataset,
        rows=inspected,
        notes=_notes(trainer, len(rows), progress),
        vocabulary=tokenizer.get_vocab(),
    )


def _notes(trainer, num_rows: int, progress: float) -> list[str]:
    """What differs between these values and the Φ of a training step."""
    notes = [
        f"Φ of the starting model (before any step), at training progress {trainer.progress:g}"
        + (" (`--progress` sets it)." if progress == 0 else ".")
    ]
    priority = trainer.priority
    if priority is None:
        return notes
    settings = trainer._phi_settings  # what `phi.compute_phi` shapes Φ with, as in training
    if trainer.plan.selection_scope is not None:
        scope = trainer.plan.selection_scope
        notes.append(
            f"The top-fraction selection is made over these {num_rows} rows as one batch (like `token_priorities`); "
            f"in training it is made over its scope, '{scope}'."
        )
    if settings.warmup_ratio > trainer.progress:
        notes.append(
            f"`priority_warmup_ratio={settings.warmup_ratio}`: Φ is still blended with uniform "
            "weights (fully at progress 0, where every supervised token shows Φ = 1)."
        )
    if trainer.plan.stateful:
        notes.append("A stateful method: its history is empty before training.")
    terms = [term.name for term in (*priority.token_terms, *priority.distribution_terms)]
    if terms:
        notes.append(
            f"The method adds loss terms ({', '.join(terms)}); Q_y shows the target of the Φ-weighted likelihood "
            "alone, which these terms move further."
        )
    return notes


def inspect_recipes(
    recipes: list[str], overrides: list[str], num_examples: int, progress: float = 0.0
) -> list[Inspection]:
    """Build each recipe's trainer and inspect its first `num_examples` prepared training rows. Several recipes must
    read the same dataset with the same tokenizer: they are shown on the same rows."""
    parsed = [parse_recipe(["--config", recipe, *overrides]) for recipe in recipes]
    datasets = [(s.dataset_name, s.dataset_config, s.dataset_train_split, d.datasets) for s, _, _, d in parsed]
    for recipe, dataset in zip(recipes[1:], datasets[1:]):
        if dataset != datasets[0]:
            raise SystemExit(
                f"trl-priority inspect --compare: {recipes[0]} reads the dataset {_dataset_name(datasets[0])} but "
                f"{recipe} reads {_dataset_name(dataset)}. Compare recipes on the same data: give both the same "
                f"`dataset_name` (e.g. `--dataset_name {datasets[0][0]}` after the recipes)."
            )
    inspections = []
    with tempfile.TemporaryDirectory(prefix="trl-priority-inspect-") as scratch:
        for index, (recipe, args) in enumerate(zip(recipes, parsed)):
            script_args, _, model_args, _ = args
            trainer = build_inspection_trainer(args, os.path.join(scratch, str(index)))
            rows = list(itertools.islice(iter(trainer.train_dataset), num_examples))
            inspection = inspect_trainer(
                trainer, rows, recipe, model_args.model_name_or_path, _dataset_name(datasets[index]), progress
            )
            if inspections:
                _check_same_rows(inspections[0], inspection)
            inspections.append(inspection)
            del trainer  # two models at a time at most
    return inspections


def _dataset_name(dataset) -> str:
    name, config, split, mixture = dataset
    if mixture:
        return "mixture " + ", ".join(str(getattr(entry, "path", entry)) for entry in mixture)
    return f"'{name}'" + (f" ({config})" if config else "") + f", split '{split}'"


def _check_same_rows(first: Inspection, other: Inspection) -> None:
    if first.vocabulary != other.vocabulary:
        raise SystemExit(
            f"trl-priority inspect --compare: {first.recipe} ({first.model}) and {other.recipe} ({other.model}) use "
            "different tokenizers, so their tokens cannot be shown side by side. Compare recipes of the same model "
            "family (same tokenizer)."
        )
    if len(first.rows) != len(other.rows):
        raise SystemExit(
            f"trl-priority inspect --compare: {first.recipe} has {len(first.rows)} training rows to show but "
            f"{other.recipe} has {len(other.rows)}; lower --num-examples."
        )
    for index, (a, b) in enumerate(zip(first.rows, other.rows)):
        if a.input_ids != b.input_ids:
            raise SystemExit(
                f"trl-priority inspect --compare: the prepared example {index} differs between {first.recipe} "
                f"({len(a.input_ids)} tokens) and {other.recipe} ({len(b.input_ids)} tokens): the recipes prepare "
                "the data differently (`max_length`, `packing`, chat template, completion-only settings). Give both "
                "the same settings, e.g. as overrides after the recipes."
            )


# ----------------------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-priority inspect",
        allow_abbrev=False,  # `--output_dir` of a recipe must not be taken for `--output`
        description="Show the priority Φ of a recipe's first training examples, before training: an HTML page and/or "
        "a terminal rendering. Other settings (`--model_name_or_path ...`) override the recipe(s), as in "
        "`trl-priority sft`.",
    )
    parser.add_argument("--config", help="the recipe, e.g. recipes/rho1.yaml")
    parser.add_argument("--compare", nargs=2, metavar=("A.yaml", "B.yaml"), help="two recipes side by side")
    parser.add_argument("--num-examples", "--num_examples", type=int, default=3, dest="num_examples")
    parser.add_argument("--output", help="the HTML page to write (default priorities.html, none with --terminal)")
    parser.add_argument("--terminal", action="store_true", help="print the tokens to the terminal")
    parser.add_argument(
        "--progress", type=float, default=0.0, help="training progress in [0, 1] for schedules and curricula"
    )
    return parser


def main(argv: list[str]) -> int:
    parser = make_parser()
    args, overrides = parser.parse_known_args(argv)
    if (args.config is None) == (args.compare is None):
        parser.error("give a recipe with --config, or two with --compare (not both)")
    if args.num_examples < 1:
        parser.error(f"--num-examples must be at least 1, got {args.num_examples}")
    recipes = [args.config] if args.config else list(args.compare)
    for recipe in recipes:
        if not Path(recipe).is_file():
            parser.error(f"the recipe '{recipe}' does not exist")
    if not 0 <= args.progress <= 1:
        parser.error(f"--progress must be in [0, 1] (the fraction of training done), got {args.progress}")
    inspections = inspect_recipes(recipes, overrides, args.num_examples, args.progress)
    if args.terminal:
        sys.stdout.write(render_terminal(inspections, colour=sys.stdout.isatty()))
    output = args.output or (None if args.terminal else "priorities.html")
    if output:
        Path(output).write_text(render_html(inspections), encoding="utf-8")
        shown = len(inspections[0].rows)
        print(f"Wrote {output}: {shown} examples, {' vs '.join(i.method for i in inspections)}.", file=sys.stderr)
    return 0
