"""`trl-priority inspect`: the page's numbers are the trainer's (Φ = `token_priorities`, p from full logits), the target
Q against autograd, the compare page, the terminal rendering, and the page as a real browser renders it."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from trl_priority.objectives import priority_loss
from trl_priority.tools import render
from trl_priority.tools import viewer as inspect
from trl_priority.tools.cli import main


RECIPES = Path(__file__).parents[2] / "recipes"
FAST = ["--max_length", "1024", "--per_device_train_batch_size", "2"]  # the tiny tokenizer spends many tokens


class Page(HTMLParser):
    """The machine-readable parts of an inspect page: methods, per-example panels with their token attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.methods, self.panels, self.histograms = [], [], []
        self._example = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "example" in classes:
            self._example = int(attrs["data-index"])
        elif tag == "div" and "method" in classes:
            self.methods.append({"method": attrs["data-method"], "recipe": attrs["data-recipe"]})
        elif tag == "div" and "overall" in classes:
            self.methods[-1]["overall"] = attrs
        elif tag == "svg" and "histogram" in classes:
            self.histograms.append([int(c) for c in attrs["data-counts"].split(",")])
        elif tag == "div" and "panel" in classes:
            self.panels.append({"method": attrs["data-method"], "example": self._example, "tokens": []})
        elif tag == "div" and "stats" in classes:
            self.panels[-1]["stats"] = attrs
        elif tag == "span" and "data-pos" in attrs and self.panels:
            self.panels[-1]["tokens"].append(attrs)

    def panel(self, example: int, method: str | None = None) -> dict:
        (found,) = [p for p in self.panels if p["example"] == example and method in (None, p["method"])]
        return found


def column(tokens: list[dict], name: str) -> torch.Tensor:
    assert [int(t["data-pos"]) for t in tokens] == list(range(len(tokens)))
    return torch.tensor([float(t[name]) if t.get(name) else float("nan") for t in tokens], dtype=torch.float32)


def build(recipe: str, overrides: list[str], scratch: Path, num_examples: int = 2, progress: float = 0.0):
    """The recipe's trainer as `trl-priority inspect` builds it, its first rows, and their inspection."""
    parsed = inspect.parse_recipe(["--config", str(RECIPES / recipe), *FAST, *overrides])
    trainer = inspect.build_inspection_trainer(parsed, str(scratch))
    rows = list(itertools.islice(iter(trainer.train_dataset), num_examples))
    return trainer, rows, inspect.inspect_trainer(trainer, rows, recipe, progress=progress)


def expected_q(phi: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Q_y in closed form (unlikelihood): Φ + (1 − Φ)·p for Φ ≥ 0, (1 + Φ)·p for Φ < 0."""
    return torch.where(phi < 0, (1 + phi) * p, phi + (1 - phi) * p)


def check_page_against_trainer(page: Page, trainer, rows, label_logps, reference=None, method=None):
    """Every supervised token's Φ equals `token_priorities` for the same rows (to the bit), p and p_ref equal the
    full-logits oracle (`reference`: a model, "adapter off" or None), Q_y its closed form, and the per-example kept
    fraction and mean Φ their definitions."""
    phi = trainer.token_priorities(rows)  # (N, T-1)
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.eval()
    p = label_logps(trainer.model, batch).exp()
    if reference == "adapter off":
        with trainer.model.disable_adapter():
            p_ref = label_logps(trainer.model, batch).exp()
    else:
        p_ref = None if reference is None else label_logps(reference, batch).exp()
    for i, row in enumerate(rows):
        n = len(row["input_ids"]) - 1
        tokens = page.panel(i, method)["tokens"]
        assert len(tokens) == n
        mask = column(tokens, "data-supervised").bool()
        assert torch.equal(mask, batch["labels"][i, 1 : n + 1].cpu() != -100)
        shown = column(tokens, "data-phi")
        assert torch.equal(shown, phi[i, :n].cpu()), "Φ on the page differs from token_priorities"
        torch.testing.assert_close(column(tokens, "data-p")[mask], p[i, :n].cpu()[mask], atol=1e-5, rtol=1e-4)
        q = column(tokens, "data-q")[mask]
        torch.testing.assert_close(q, expected_q(shown[mask], column(tokens, "data-p")[mask]), atol=1e-6, rtol=1e-5)
        if p_ref is None:
            assert all(t["data-pref"] == "" for t, m in zip(tokens, mask) if m)
        else:
            shown_ref = column(tokens, "data-pref")[mask]
            torch.testing.assert_close(shown_ref, p_ref[i, :n].cpu()[mask], atol=1e-5, rtol=1e-4)
        classes = [t["data-class"] for t, m in zip(tokens, mask) if m]
        assert classes == [render.phi_class(v) for v in shown[mask].tolist()]
        stats = page.panel(i, method)["stats"]
        assert float(stats["data-kept-fraction"]) == pytest.approx((shown[mask] > 0).float().mean().item())
        assert float(stats["data-mean-phi"]) == pytest.approx(shown[mask].mean().item(), abs=1e-6)
    return phi


# -----------------------------------------------------------------------------------------------------------------
# The numbers
# -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "recipe, reference, progress, classes",
    [
        ("prift_prob.yaml", "adapter off", 0.0, {"down"}),  # the reference it reads: the base, adapter switched off
        ("rho1.yaml", "model", 0.0, {"kept", "dropped"}),  # a trained reference; selection over the shown rows
        ("prift_mass.yaml", "model", 0.0, None),  # reads ref_mass only: p_ref from one more reference pass
        ("forgetting_data.yaml", None, 1.0, {"kept", "negative"}),  # signed, at the end of its schedule
        ("verified_prift.yaml", "adapter off", 0.0, None),  # a composition: verifier × prift_prob
    ],
    ids=["prift_prob", "rho1", "prift_mass", "forgetting_data", "verified_prift"],
)
def test_page_shows_the_trainers_priorities(recipe, reference, progress, classes, tmp_path, model_dir, label_logps):
    from transformers import AutoModelForCausalLM

    overrides = ["--model_name_or_path", model_dir(seed=0)]
    if reference == "model":
        overrides += ["--ref_model_name_or_path", model_dir(seed=1)]
        reference = AutoModelForCausalLM.from_pretrained(model_dir(seed=1)).eval()
    trainer, rows, inspection = build(recipe, overrides, tmp_path / "scratch", progress=progress)
    if reference == "adapter off":
        assert inspection.reference == "base model with the adapter switched off"
    page = Page(render.render_html([inspection]))
    phi = check_page_against_trainer(page, trainer, rows, label_logps, reference)

    composed = {"verified_prift.yaml": "product(verifier, prift_prob)"}  # a composition shows its parts
    assert [m["method"] for m in page.methods] == [composed.get(recipe, recipe.removesuffix(".yaml"))]
    mask = trainer.data_collator(rows)["labels"][:, 1:] != -100  # (N, T-1)
    supervised = phi.cpu()[mask]
    overall = page.methods[0]["overall"]
    assert float(overall["data-kept-fraction"]) == pytest.approx((supervised > 0).float().mean().item())
    assert page.histograms[0] and sum(page.histograms[0]) == supervised.numel()
    shown_classes = {t["data-class"] for p in page.panels for t in p["tokens"] if t["data-supervised"] == "1"}
    if classes is not None:
        assert shown_classes == classes

    # The terminal rendering of the same rows: one marker per supervised token, with its Φ
    text = render.render_terminal([inspection], colour=False)
    markers = [float(v) for v in re.findall(r"\|(-?\d+\.\d+(?:e-?\d+)?)\]", text)]
    torch.testing.assert_close(torch.tensor(markers), supervised, atol=0.005, rtol=0.05)


@pytest.mark.parametrize("negative_loss", ["unlikelihood", "ascent"])
def test_target_is_p_minus_the_logit_gradient(negative_loss):
    """For each position alone, ∂(weighted loss)/∂logits = p − Q with Q from `target_distribution`, checked with
    autograd through the trainer's own loss (`priority_loss`); `target_weight` is Q at the observed token."""
    torch.manual_seed(0)
    n, vocab = 12, 7
    logits = (2 * torch.randn(n, vocab, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(vocab, (n,))
    phi = torch.tensor([-2.0, -1.0, -0.6, -0.1, 0.0, 0.0, 0.2, 0.5, 0.9, 1.0, 1.5, 3.0], dtype=torch.float64)
    logps = logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)  # (n,)
    loss = priority_loss(logps[None], phi[None], num_items=1, negative_loss=negative_loss)
    (gradient,) = torch.autograd.grad(loss, logits)
    p = logits.detach().softmax(-1)
    q = inspect.target_distribution(logits.detach(), labels, phi, negative_loss)
    torch.testing.assert_close(q.double(), p - gradient, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.sum(-1).double(), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-6)
    q_y = inspect.target_weight(phi, logps.detach(), negative_loss)
    torch.testing.assert_close(q_y, q.gather(-1, labels[:, None]).squeeze(-1).double(), rtol=1e-5, atol=1e-6)
    p_y = p.gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(q_y[phi == 0], p_y[phi == 0])  # Φ = 0: the target is the model itself
    torch.testing.assert_close(q_y[phi == 1], torch.ones_like(q_y[phi == 1]))  # Φ = 1: the one-hot of SFT
    negative = phi < 0
    if negative_loss == "unlikelihood":  # bounded: Q_y = (1 + Φ)·p_y ≤ p_y, 0 at Φ = −1
        torch.testing.assert_close(q_y[negative], (1 + phi[negative]) * p_y[negative])
    else:  # ascent: Q_y = Φ + (1 − Φ)·p_y < 0, no distribution
        assert (q_y[negative] < 0).all()


# -----------------------------------------------------------------------------------------------------------------
# Compare, terminal
# -----------------------------------------------------------------------------------------------------------------
def test_compare_page_shows_both_methods_on_the_same_tokens(tmp_path, model_dir, label_logps):
    output = tmp_path / "compare.html"
    policy, teacher = model_dir(seed=0), model_dir(seed=1)
    settings = ["--model_name_or_path", policy, "--ref_model_name_or_path", teacher, *FAST]
    recipes = [str(RECIPES / "prift_prob.yaml"), str(RECIPES / "rho1.yaml")]
    assert main(["inspect", "--compare", *recipes, "--num-examples", "2", "--output", str(output), *settings]) == 0
    page = Page(output.read_text())
    assert [m["method"] for m in page.methods] == ["prift_prob", "rho1"]
    assert len(page.panels) == 4 and len(page.histograms) == 2
    for example in (0, 1):
        left, right = page.panel(example, "prift_prob"), page.panel(example, "rho1")
        assert [t["data-supervised"] for t in left["tokens"]] == [t["data-supervised"] for t in right["tokens"]]
        assert {t["data-class"] for t in left["tokens"] if "data-class" in t} == {"down"}
        assert {t["data-class"] for t in right["tokens"] if "data-class" in t} == {"kept", "dropped"}
    # The rho1 side is the rho1 trainer's, on the same rows
    from transformers import AutoModelForCausalLM

    trainer, rows, _ = build("rho1.yaml", settings[:4], tmp_path / "scratch")
    reference = AutoModelForCausalLM.from_pretrained(teacher).eval()
    check_page_against_trainer(page, trainer, rows, label_logps, reference, method="rho1")


def test_compare_refuses_recipes_on_other_data(tmp_path, model_dir):
    recipes = [str(RECIPES / "prift_prob.yaml"), str(RECIPES / "forgetting_data.yaml")]
    with pytest.raises(SystemExit, match="reads the dataset 'builtin:gsm8k'.*but .*forgetting_data.yaml reads "):
        main(["inspect", "--compare", *recipes, "--model_name_or_path", model_dir(seed=0)])
    # Same dataset, prepared differently: the tokens are not the same, so they cannot be shown side by side
    shorter = tmp_path / "short.yaml"
    shorter.write_text((RECIPES / "dft.yaml").read_text().replace("max_length: 512", "max_length: 200"))
    recipes = [str(RECIPES / "dft.yaml"), str(shorter)]
    with pytest.raises(SystemExit, match="prepared example 0 differs .*max_length"):
        main(["inspect", "--compare", *recipes, "--model_name_or_path", model_dir(seed=0), "--num-examples", "1"])
    with pytest.raises(SystemExit, match="unknown setting 'num_exmples'"):
        main(["inspect", "--config", str(RECIPES / "dft.yaml"), "--num_exmples", "2"])


def test_compare_refuses_models_with_other_tokenizers():
    """Two recipes on the same data but models of different tokenizers cannot be shown token by token."""
    first, other = synthetic_inspection(), synthetic_inspection()
    first.vocabulary, other.vocabulary = {"a": 0, "b": 1}, {"a": 0, "c": 1}
    other.recipe, other.model = "other.yaml", "other-model"
    with pytest.raises(SystemExit, match=r"r.yaml \(m\) and other.yaml \(other-model\) use different tokenizers"):
        inspect._check_same_rows(first, other)
    other.vocabulary = dict(first.vocabulary)
    inspect._check_same_rows(first, other)  # same tokenizer, same rows: accepted


def synthetic_inspection() -> inspect.Inspection:
    """Two rows by hand: a prompt, then supervised tokens of every class (one a newline)."""
    rows = [
        inspect.Row(
            tokens=["<s>", "Q:", " 2+2", "\n", "A:", " 4", ".", "\n", "####"],
            input_ids=list(range(9)),
            mask=[False, False, False, True, True, True, True, True],
            phi=[0.0, 0.0, 0.0, 1.0, 0.25, 0.0, -0.5, 2.0],
            q=[0.0] * 8,
            p=[0.5] * 8,
            p_ref=None,
        ),
        inspect.Row(
            tokens=["<s>", "x", "y"], input_ids=[0, 1, 2], mask=[True, True], phi=[1.0, 0.003], q=[1.0, 0.5],
            p=[0.5, 0.5], p_ref=[0.4, 0.4],
        ),
    ]  # fmt: skip
    return inspect.Inspection("r.yaml", "demo", {"a": 1}, "none", "unlikelihood", "m", "d", rows)


def test_terminal_rendering_marks_every_supervised_token():
    inspection = synthetic_inspection()
    plain = render.render_terminal([inspection], colour=False)
    assert "\x1b[" not in plain
    assert "<s>Q: 2+2\n[A:|1.00][ 4|0.25][.|0.00][↵|-0.50]\n[####|2.00]" in plain  # the prompt plain, a newline kept
    assert "<s>[x|1.00][y|3.0e-03]" in plain  # a small Φ is not shown as a dropped 0.00
    assert "-- example 0, demo: kept 60.0% of 5 supervised tokens, mean Φ 0.550" in plain
    assert "== demo overall: kept 71.4% of 7 supervised tokens" in plain
    bars = re.findall(r"^  \[\s*(-?[\d.]+),\s*(-?[\d.]+)[)\]] (#*)\s+(\d+)$", plain, flags=re.M)
    assert len(bars) == 10 and sum(int(count) for *_, count in bars) == 7
    assert (bars[0][0], bars[-1][1]) == ("-0.50", "2.00")  # the range covers every Φ

    coloured = render.render_terminal([inspection], colour=True)
    for klass, token in [("kept", "A:"), ("down", " 4"), ("dropped", "."), ("negative", "↵"), ("up", "####")]:
        assert f"{render.ANSI[klass]}{token}{render.RESET}" in coloured
    assert f"{render.ANSI['ctx']}Q:{render.RESET}" in coloured


def test_terminal_command_without_a_tty_prints_markers(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = str(RECIPES / "sft.yaml")
    command = ["inspect", "--config", recipe, "--num-examples", "1", "--terminal", *FAST]
    assert main([*command, "--model_name_or_path", model_dir(seed=0)]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "[<|im_end|>|1.00]" in out
    assert "== sft overall: kept 100.0% of " in out
    assert not (tmp_path / "priorities.html").exists()  # --terminal alone writes no page


# -----------------------------------------------------------------------------------------------------------------
# A real browser
# -----------------------------------------------------------------------------------------------------------------
def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture
def browser():
    path = chromium()
    if path is None:
        if os.environ.get("TRL_PRIORITY_REQUIRE_BROWSER") == "1":
            pytest.fail("TRL_PRIORITY_REQUIRE_BROWSER=1 but no Chromium is installed (apt-get install chromium).")
        pytest.skip("no Chromium (apt-get install chromium); set TRL_PRIORITY_REQUIRE_BROWSER=1 to require it")
    return path


def run_browser(path: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
    ]  # fmt: skip
    result = subprocess.run([path, *flags, *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_page_in_a_real_browser(browser, tmp_path, model_dir, label_logps):
    """Chromium renders the page: the DOM it builds carries the trainer's Φ, and its screenshot shows the classes in
    their colours."""
    from PIL import Image

    overrides = ["--model_name_or_path", model_dir(seed=0)]
    trainer, rows, inspection = build("forgetting_data.yaml", overrides, tmp_path / "scratch", progress=1.0)
    page_path = tmp_path / "page.html"
    page_path.write_text(render.render_html([inspection]), encoding="utf-8")

    dom = run_browser(browser, tmp_path / "profile", "--dump-dom", page_path.as_uri()).stdout
    assert "<html" in dom[:100] and "Token priorities: forgetting_data" in dom
    check_page_against_trainer(Page(dom), trainer, rows, label_logps)

    screenshot = tmp_path / "page.png"
    size = "--window-size=1200,1600"
    run_browser(browser, tmp_path / "profile", f"--screenshot={screenshot}", size, page_path.as_uri())
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = list(image.getdata())

    def painted(klass: str, phi: float) -> int:
        """Pixels of a token background of `klass`: its colour at its opacity, over white."""
        alpha = render._shade(klass, phi)
        target = tuple(round(255 + (c - 255) * alpha) for c in render.COLOURS[klass])
        return sum(all(abs(a - b) <= 3 for a, b in zip(pixel, target)) for pixel in pixels)

    assert painted("kept", 1.0) > 2000  # example 0: learned
    assert painted("negative", -0.25) > 2000  # example 1: unlearned, Φ = −λ = −0.25 at the end of the schedule
