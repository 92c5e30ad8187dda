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
import html
import itertools
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


CLASSES = ("kept", "up", "down", "dropped", "negative")
CLASS_LABELS = {
    "kept": "kept (Φ = 1)",
    "up": "up-weighted (Φ > 1)",
    "down": "down-weighted (0 < Φ < 1)",
    "dropped": "dropped (Φ = 0)",
    "negative": "negative (Φ < 0, unlearned)",
}
COLOURS = {  # (red, green, blue) of each class; down-weighted and negative tokens are shaded by |Φ|
    "kept": (116, 198, 157),
    "up": (27, 122, 72),
    "down": (244, 162, 38),
    "dropped": (206, 212, 218),
    "negative": (220, 47, 60),
}
HISTOGRAM_BINS = 20
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


def phi_class(phi: float) -> str:
    """One of `CLASSES`: Φ = 1 kept, Φ > 1 up-weighted, 0 < Φ < 1 down-weighted, Φ = 0 dropped, Φ < 0 negative."""
    if phi < 0:
        return "negative"
    if phi == 0:
        return "dropped"
    if abs(phi - 1) <= 1e-6:  # a soft Φ of 0.9999999 is kept in all but name
        return "kept"
    return "down" if phi < 1 else "up"


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


def summary(values: list[float]) -> dict[str, float]:
    """Kept fraction (share of the supervised tokens with Φ > 0, the trainer's `priority/kept_fraction`), mean Φ,
    count."""
    n = len(values)
    return {
        "kept_fraction": sum(v > 0 for v in values) / n if n else 0.0,
        "mean_phi": sum(values) / n if n else 0.0,
        "tokens": n,
    }


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
# HTML
# ----------------------------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    """Enough digits to read a float32 back exactly."""
    return format(value, ".9g")


def _rgba(name: str, alpha: float = 1.0) -> str:
    red, green, blue = COLOURS[name]
    return f"rgba({red},{green},{blue},{alpha:.3f})"


def _shade(klass: str, phi: float) -> float:
    """Background opacity: down-weighted tokens fade with Φ, negative ones deepen with |Φ|; the others are solid."""
    if klass == "down":
        return 0.15 + 0.85 * phi
    if klass == "negative":
        return 0.35 + 0.65 * min(1.0, -phi)
    return 1.0


def _visible(token: str) -> str:
    """A token as text on the page: newlines and tabs made visible, the newline kept as a line break."""
    return token.replace("\t", "⇥").replace("\n", "↵\n")


def _token_spans(row: Row) -> str:
    spans = [f'<span class="t ctx">{html.escape(_visible(row.tokens[0]))}</span>']  # nothing predicts the first
    for t, token in enumerate(row.tokens[1:]):
        phi, supervised = row.phi[t], row.mask[t]
        p_ref = None if row.p_ref is None else row.p_ref[t]
        attributes = f'data-pos="{t}" data-phi="{_number(phi)}" data-supervised="{int(supervised)}"'
        text = html.escape(_visible(token))
        if not supervised:
            spans.append(f'<span class="t ctx" {attributes}>{text}</span>')
            continue
        klass = phi_class(phi)
        tip = f"Φ {phi:.4f}\nQ_y {row.q[t]:.4f}\np policy {row.p[t]:.4f}\n" + (
            f"p reference {p_ref:.4f}" if p_ref is not None else "p reference -"
        )
        attributes += f' data-q="{_number(row.q[t])}" data-p="{_number(row.p[t])}"'
        attributes += f' data-pref="{"" if p_ref is None else _number(p_ref)}" data-class="{klass}"'
        style = f"background:{_rgba(klass, _shade(klass, phi))}"
        spans.append(
            f'<span class="t {klass}" style="{style}" {attributes} data-tip="{html.escape(tip)}">{text}</span>'
        )
    return "".join(spans)


def histogram_bins(values: list[float], bins: int = HISTOGRAM_BINS) -> tuple[list[float], list[int], list[float]]:
    """`(edges, counts, means)` over [min(0, Φ), max(1, Φ)]: `bins` equal bins, the last one closed."""
    low, high = min([0.0, *values]), max([1.0, *values])
    width = (high - low) / bins
    edges = [low + i * width for i in range(bins + 1)]
    members: list[list[float]] = [[] for _ in range(bins)]
    for value in values:
        members[min(bins - 1, int((value - low) / width))].append(value)
    counts = [len(m) for m in members]
    means = [sum(m) / len(m) if m else math.nan for m in members]
    return edges, counts, means


def _histogram_svg(values: list[float]) -> str:
    edges, counts, means = histogram_bins(values)
    width, height, top, bottom, left = 380, 150, 14, 22, 34
    plot_height = height - top - bottom
    bar_width = (width - left - 6) / len(counts)
    tallest = max(counts) or 1
    parts = [
        f'<svg class="histogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'data-edges="{",".join(_number(e) for e in edges)}" data-counts="{",".join(map(str, counts))}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>Histogram of Φ over the supervised tokens</title>',
        f'<line x1="{left}" y1="{top + plot_height}" x2="{width - 4}" y2="{top + plot_height}" stroke="#888"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{tallest}</text>',
        f'<text x="{left - 4}" y="{top + plot_height}" text-anchor="end">0</text>',
    ]
    for i, (count, mean) in enumerate(zip(counts, means)):
        if not count:
            continue
        bar = plot_height * count / tallest
        x = left + i * bar_width
        klass = phi_class(mean)
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_height - bar:.1f}" width="{bar_width - 2:.1f}" height="{bar:.1f}" '
            f'fill="{_rgba(klass, max(0.5, _shade(klass, mean)))}" stroke="#555" stroke-width="0.5">'
            f"<title>Φ in [{edges[i]:.3g}, {edges[i + 1]:.3g}{']' if i == len(counts) - 1 else ')'}: {count} "
            f"tokens</title></rect>"
        )
    for value in sorted({edges[0], 0.0, 1.0, edges[-1]}):
        x = left + (value - edges[0]) / (edges[-1] - edges[0]) * (width - left - 6)
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{value:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _stats_line(values: list[float], cls: str) -> str:
    s = summary(values)
    return (
        f'<div class="{cls}" data-kept-fraction="{_number(s["kept_fraction"])}" data-mean-phi="{_number(s["mean_phi"])}"'
        f' data-tokens="{s["tokens"]}">kept <b>{100 * s["kept_fraction"]:.1f}%</b> of {s["tokens"]} supervised tokens'
        f" · mean Φ <b>{s['mean_phi']:.3f}</b></div>"
    )


def _method_header(inspection: Inspection) -> str:
    args = ", ".join(f"{k}={v}" for k, v in inspection.priority_args.items()) or "(none)"
    values = [phi for row in inspection.rows for phi in row.supervised()]
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in inspection.notes)
    return (
        f'<div class="method" data-method="{html.escape(inspection.method)}" '
        f'data-recipe="{html.escape(inspection.recipe)}">'
        f"<h2>{html.escape(inspection.method)}</h2><dl>"
        f"<dt>recipe</dt><dd>{html.escape(inspection.recipe or '-')}</dd>"
        f"<dt>arguments</dt><dd>{html.escape(args)}</dd>"
        f"<dt>reference</dt><dd>{html.escape(inspection.reference)}</dd>"
        f"<dt>model</dt><dd>{html.escape(inspection.model or '-')}</dd>"
        f"<dt>dataset</dt><dd>{html.escape(inspection.dataset or '-')}</dd>"
        f"<dt>negative Φ</dt><dd>{html.escape(inspection.negative_loss)}</dd></dl>"
        f"{_stats_line(values, 'overall')}{_histogram_svg(values)}<ul class='notes'>{notes}</ul></div>"
    )


def _legend() -> str:
    items = ['<span class="t ctx">prompt / not supervised</span>']
    for klass in ("kept", "up", "down", "dropped", "negative"):
        if klass in ("down", "negative"):
            faint, strong = _rgba(klass, _shade(klass, 0.1 if klass == "down" else -0.1)), _rgba(klass)
            style = f"background:linear-gradient(90deg,{faint},{strong})"
        else:
            style = f"background:{_rgba(klass)}"
        items.append(f'<span class="t {klass}" style="{style}">{html.escape(CLASS_LABELS[klass])}</span>')
    return (
        '<div class="legend">' + " ".join(items) + "<p>Down-weighted tokens fade as Φ falls, negative ones deepen as "
        "|Φ| grows. Hover a token for Φ, Q<sub>y</sub> (the weight the loss's target puts on the observed token: "
        "Φ + (1 − Φ)·p for Φ ≥ 0, (1 + Φ)·p for Φ &lt; 0 under unlikelihood), and the policy's and reference's "
        "probability p of the token.</p></div>"
    )


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:20px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 10px}h2{font-size:16px;margin:0 0 6px}h3{font-size:14px;margin:18px 0 6px}
.methods,.panels{display:grid;gap:16px;grid-template-columns:repeat(var(--n),minmax(0,1fr))}
.method{border:1px solid #ddd;border-radius:6px;padding:10px 12px}
dl{display:grid;grid-template-columns:auto 1fr;gap:1px 10px;margin:0 0 6px}dt{color:#666}dd{margin:0}
.notes{margin:4px 0 0;padding-left:18px;color:#555;font-size:12px}
.histogram text{font-size:10px;fill:#555}
.legend{margin:12px 0;padding:8px 10px;background:#f7f7f7;border-radius:6px}.legend p{margin:6px 0 0;font-size:12px}
.legend .t{margin-right:6px;padding:1px 6px}
.panel{border:1px solid #e3e3e3;border-radius:6px;padding:8px 10px}.panel h4{margin:0 0 4px;font-size:13px}
.stats,.overall{font-size:12px;color:#333;margin:2px 0 6px}
.tokens{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.t{position:relative;border-radius:2px}.t[data-tip]{box-shadow:inset -1px 0 0 rgba(255,255,255,.9)}
.t.ctx{color:#9a9a9a}.t.up{color:#fff;font-weight:600}.t.dropped{color:#555}
.t[data-tip]:hover{outline:2px solid #222;z-index:2}
.t[data-tip]:hover::after{content:attr(data-tip);position:absolute;left:0;top:1.9em;z-index:3;white-space:pre;
  background:#222;color:#fff;font-size:12px;line-height:1.4;padding:5px 8px;border-radius:4px;pointer-events:none}
"""


def render_html(inspections: list[Inspection]) -> str:
    """One self-contained page (inline CSS and SVG, no script): the methods side by side, then each example."""
    n = len(inspections)
    title = " vs ".join(i.method for i in inspections)
    examples = []
    for index in range(len(inspections[0].rows)):
        panels = []
        for inspection in inspections:
            row = inspection.rows[index]
            panels.append(
                f'<div class="panel" data-method="{html.escape(inspection.method)}">'
                + (f"<h4>{html.escape(inspection.method)}</h4>" if n > 1 else "")
                + _stats_line(row.supervised(), "stats")
                + f'<div class="tokens">{_token_spans(row)}</div></div>'
            )
        examples.append(
            f'<section class="example" data-index="{index}"><h3>Example {index}</h3>'
            f'<div class="panels" style="--n:{n}">{"".join(panels)}</div></section>'
        )
    headers = "".join(_method_header(i) for i in inspections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>trl-priority inspect: {html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Token priorities: {html.escape(title)}</h1>"
        f'<div class="methods" style="--n:{n}">{headers}</div>{_legend()}{"".join(examples)}</body></html>\n'
    )


# ----------------------------------------------------------------------------------------------------------------
# Terminal
# ----------------------------------------------------------------------------------------------------------------
ANSI = {  # background, foreground
    "kept": "\x1b[42;30m",
    "up": "\x1b[102;30;1m",
    "down": "\x1b[43;30m",
    "dropped": "\x1b[47;30m",
    "negative": "\x1b[41;97m",
    "ctx": "\x1b[2m",
}
RESET = "\x1b[0m"


def _marker_number(phi: float) -> str:
    """Φ with two decimals; a small non-zero Φ in scientific notation, so that it never reads as a dropped 0.00."""
    return f"{phi + 0.0:.2f}" if phi == 0 or abs(phi) >= 0.005 else f"{phi:.1e}"  # + 0.0: no "-0.00"


def _terminal_tokens(row: Row, colour: bool) -> str:
    """The row's text: unsupervised tokens plain (dim in colour), supervised ones coloured by class or, without
    colour, as `[token|Φ]`."""
    out = []
    for t, token in enumerate(row.tokens):
        supervised = t > 0 and row.mask[t - 1]
        text = token.replace("\n", "↵") if supervised else token
        if not supervised:
            out.append(f"{ANSI['ctx']}{text}{RESET}" if colour else text)
        elif colour:
            out.append(f"{ANSI[phi_class(row.phi[t - 1])]}{text}{RESET}")
        else:
            out.append(f"[{text}|{_marker_number(row.phi[t - 1])}]")
        if supervised and "\n" in token:
            out.append("\n")  # the newline itself, after its marker
    return "".join(out)


def _text_histogram(values: list[float], bins: int = 10, width: int = 40) -> list[str]:
    edges, counts, _ = histogram_bins(values, bins)
    tallest = max(counts) or 1
    lines = []
    for i, count in enumerate(counts):
        close = "]" if i == bins - 1 else ")"
        bar = "#" * round(width * count / tallest)
        lines.append(f"  [{edges[i]:6.2f}, {edges[i + 1]:6.2f}{close} {bar:<{width}} {count}")
    return lines


def _terminal_summary(values: list[float]) -> str:
    s = summary(values)
    return f"kept {100 * s['kept_fraction']:.1f}% of {s['tokens']} supervised tokens, mean Φ {s['mean_phi']:.3f}"


def render_terminal(inspections: list[Inspection], colour: bool = False) -> str:
    """Plain text: per method its settings; per example each method's tokens, kept fraction and mean Φ; overall the
    kept fraction and a text histogram of Φ."""
    lines = []
    for inspection in inspections:
        args = ", ".join(f"{k}={v}" for k, v in inspection.priority_args.items()) or "-"
        lines.append(f"== {inspection.method} ({inspection.recipe or '-'}): {args}")
        lines.append(f"   reference: {inspection.reference}; negative Φ: {inspection.negative_loss}")
        lines += [f"   note: {note}" for note in inspection.notes]
    if colour:
        legend = " ".join(f"{ANSI[k]}{CLASS_LABELS[k]}{RESET}" for k in CLASSES)
        lines.append(f"legend: {ANSI['ctx']}prompt{RESET} {legend}")
    else:
        lines.append("legend: supervised tokens as [token|Φ], ↵ a newline; prompt tokens plain")
    for index in range(len(inspections[0].rows)):
        for inspection in inspections:
            row = inspection.rows[index]
            lines.append("")
            lines.append(f"-- example {index}, {inspection.method}: {_terminal_summary(row.supervised())}")
            lines.append(_terminal_tokens(row, colour))
    for inspection in inspections:
        values = [phi for row in inspection.rows for phi in row.supervised()]
        lines.append("")
        lines.append(f"== {inspection.method} overall: {_terminal_summary(values)}")
        lines.append("   histogram of Φ (supervised tokens):")
        lines += _text_histogram(values)
    return "\n".join(lines) + "\n"


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
