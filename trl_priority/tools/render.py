"""Rendering `trl-priority inspect`'s inspections (`trl_priority.tools.viewer`): an HTML page (tokens coloured by
their class of Φ, a tooltip with Φ, Q_y, p_y and p_ref per token, an SVG histogram of Φ per recipe) and a terminal view
(ANSI colours, or markers without a tty)."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from trl_priority.tools.viewer import Inspection, Row


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


def phi_class(phi: float) -> str:
    """One of `CLASSES`: Φ = 1 kept, Φ > 1 up-weighted, 0 < Φ < 1 down-weighted, Φ = 0 dropped, Φ < 0 negative."""
    if phi < 0:
        return "negative"
    if phi == 0:
        return "dropped"
    if abs(phi - 1) <= 1e-6:  # a soft Φ of 0.9999999 is kept in all but name
        return "kept"
    return "down" if phi < 1 else "up"


def summary(values: list[float]) -> dict[str, float]:
    """Kept fraction (share of the supervised tokens with Φ > 0, the trainer's `priority/kept_fraction`), mean Φ,
    count."""
    n = len(values)
    return {
        "kept_fraction": sum(v > 0 for v in values) / n if n else 0.0,
        "mean_phi": sum(values) / n if n else 0.0,
        "tokens": n,
    }


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
