"""Smoke test of scripts/benchmark_overhead.py on a toy size: it writes its table, CSV and chart, with finite ratios.

Not a timing test: the ratios of a toy model on a shared machine mean nothing, only that they are measured.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_overhead.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_table_csv_and_chart(tmp_path):
    script = load_script()
    argv = [
        "--methods", "sft,prift_prob", "--modes", "lora", "--references", "online,cached", "--repeats", "1",
        "--warmup", "0", "--steps", "2", "--vocab", "64", "--hidden", "32", "--layers", "1", "--seq-len", "16",
        "--batch-size", "2", "--output-dir", str(tmp_path),
    ]  # fmt: skip
    results = script.main(argv)

    # sft has one row (it reads no reference); prift_prob one per reference
    assert [(r.case.method, r.case.reference) for r in results] == [
        ("sft", "-"),
        ("prift_prob", "online"),
        ("prift_prob", "cached"),
    ]
    with open(tmp_path / "overhead.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    for row in rows:
        for key in ("time_ratio", "memory_ratio", "step_time_s", "trl_step_time_s"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (row["method"], key, value)
    targets = {(row["method"], row["reference"]): (row["time_target"], row["memory_target"]) for row in rows}
    assert targets == {("sft", "-"): ("1.05", "1.05"), ("prift_prob", "online"): ("1.4", ""),
                       ("prift_prob", "cached"): ("1.05", "1.05")}  # fmt: skip

    table = (tmp_path / "overhead.md").read_text()
    assert "| lora | `prift_prob` | cached |" in table and "python scripts/benchmark_overhead.py" in table
    assert (tmp_path / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --replot redraws the same table from the CSV, measuring nothing
    (tmp_path / "overhead.png").unlink()
    replotted = script.main(["--replot", "--output-dir", str(tmp_path)])
    assert (tmp_path / "overhead.md").read_text() == table
    for again, measured in zip(replotted, results, strict=True):
        assert again.case == measured.case
        assert again.time_ratios == pytest.approx(measured.time_ratios, rel=1e-3)  # times kept to 1 µs
    assert (tmp_path / "overhead.png").exists()


def test_cases_and_their_targets():
    script = load_script()
    cli = script.parse_args(["--methods", "asft,eaft,sft", "--modes", "lora", "--references", "online,cached"])
    rows = {(r.case.method, r.case.reference): r for r in script.build_cases(cli)}
    # a method without a reference has one row; asft's cache is a top-k of the reference's distribution
    assert set(rows) == {("asft", "online"), ("asft", "cached"), ("eaft", "-"), ("sft", "-")}
    assert not any(r.note for r in rows.values())
    assert rows[("asft", "online")].time_target == script.ONLINE_REFERENCE
    assert rows[("asft", "cached")].time_target == script.CACHED_REFERENCE
    for key in (("asft", "online"), ("asft", "cached"), ("eaft", "-")):  # a whole next-token distribution
        assert rows[key].memory_target == script.FULL_DISTRIBUTION_MEMORY, key
    assert rows[("eaft", "-")].time_target == script.POLICY_ONLY  # the policy's own distribution, no reference
    assert rows[("sft", "-")].memory_target == script.POLICY_ONLY


def profile_rows(script, tmp_path, *options) -> dict[str, dict[str, str]]:
    argv = [
        "--profile", "--methods", "sft,rho1", "--modes", "lora", "--references", "online", "--steps", "2",
        "--vocab", "64", "--hidden", "32", "--layers", "1", "--seq-len", "16", "--batch-size", "2",
        "--output-dir", str(tmp_path), *options,
    ]  # fmt: skip
    script.main(argv)
    lines = (tmp_path / "overhead_profile.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| case "))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = {}
    for line in lines:
        if line.startswith("| ") and not line.startswith(("| case", "|---")):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = dict(zip(columns, cells))
    assert set(rows) == {"TRL SFTTrainer (lora)", "sft (lora)", "rho1 (lora, online ref)"}, rows.keys()
    return rows


def test_profile_reports_the_regions_the_trainer_marks(tmp_path):
    """`--profile`: the trainer's marked regions show up where a method runs them, and only there."""
    script = load_script()
    rows = profile_rows(script, tmp_path / "one")
    trl, sft, rho1 = rows["TRL SFTTrainer (lora)"], rows["sft (lora)"], rows["rho1 (lora, online ref)"]
    assert trl["× TRL"] == "1.00" and "aten::" in trl["top ops (self time per step)"]
    # TRL's trainer marks nothing; plain sft runs the policy only
    assert all(trl[region] == "" for region in ("step_selection", "reference", "policy_forward"))
    assert float(sft["policy_forward"]) > 0 and sft["reference"] == "" and sft["step_selection"] == ""
    # rho1 runs its reference; with one micro-batch per step it selects in the training forward, without a pass
    assert float(rho1["reference"]) > 0 and float(rho1["policy_forward"]) > 0 and rho1["step_selection"] == ""

    # Two micro-batches per step: they are scored ahead, and the reference runs only in that pass (training reuses
    # its values), so the pass contains it
    rho1 = profile_rows(script, tmp_path / "two", "--gradient-accumulation-steps", "2")["rho1 (lora, online ref)"]
    assert float(rho1["step_selection"]) >= float(rho1["reference"]) > 0


def test_s2ft_mode_counts_trainable_parameters_against_lora(tmp_path):
    """`--modes s2ft`: the method trains with S2FT, TRL with the lora mode's LoRA; the trainable-parameter columns
    equal a direct count of each, and survive `--replot`."""
    from peft import get_peft_model

    from trl_priority.beyond_tokens.structural import S2FTArgs, apply_s2ft

    script = load_script()
    argv = [
        "--methods", "sft,dft", "--modes", "s2ft", "--references", "online", "--repeats", "1", "--warmup", "0",
        "--steps", "2", "--vocab", "64", "--hidden", "32", "--layers", "1", "--seq-len", "16", "--batch-size", "2",
        "--output-dir", str(tmp_path),
    ]  # fmt: skip
    results = script.main(argv)
    assert [(r.case.mode, r.case.method, r.case.reference) for r in results] == [
        ("s2ft", "sft", "-"),
        ("s2ft", "dft", "-"),
    ]

    # Direct counts on the same model: S2FT's budget (its ratios fix the count; which slices is the strategy's
    # choice), and LoRA as the lora mode configures it
    shape = script.parse_args(argv).shape
    s2ft_model = script.make_model(shape, torch.float32)
    apply_s2ft(s2ft_model, None, S2FTArgs(strategy="random"))
    s2ft = sum(p.numel() for p in s2ft_model.parameters() if p.requires_grad)
    lora_model = get_peft_model(script.make_model(shape, torch.float32), script.lora_config())
    lora = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    assert 0 < s2ft < lora  # on this toy model too

    with open(tmp_path / "overhead.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        assert int(row["trainable_parameters"]) == s2ft, row
        assert int(row["trl_trainable_parameters"]) == lora, row
        assert row["time_target"] == "" and row["memory_target"] == ""  # no overhead target for S2FT vs LoRA
        for key in ("time_ratio", "memory_ratio"):
            assert math.isfinite(float(row[key])), (row["method"], key)
    table = (tmp_path / "overhead.md").read_text()
    assert "trainable parameters | TRL's trainable parameters |" in table
    assert "| s2ft | `dft` | - |" in table and f"| {s2ft:,} | {lora:,} |" in table

    replotted = script.main(["--replot", "--output-dir", str(tmp_path)])
    assert (tmp_path / "overhead.md").read_text() == table
    assert [(r.trainable, r.base_trainable) for r in replotted] == [([s2ft], [lora])] * 2


def test_replot_reads_a_csv_without_trainable_parameters(tmp_path):
    """A CSV written before the trainable-parameter columns existed still reads, and its table has no such column."""
    script = load_script()
    result = script.Result(script.Case("lora", "sft", "-"), "policy-only", 1.05, 1.05)
    result.times, result.base_times, result.wall_times = [1.0], [1.0], [1.0]
    result.memories, result.base_memories = [2.0**20], [2.0**20]
    result.trainable, result.base_trainable = [5], [5]
    script.write_csv([result], tmp_path / "overhead.csv")
    with open(tmp_path / "overhead.csv", newline="") as handle:
        rows = [row[:-2] for row in csv.reader(handle)]  # the two count columns are the last
    assert rows[0][-1] == "note"
    with open(tmp_path / "overhead.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    (read,) = script.read_csv(tmp_path / "overhead.csv")
    assert read.trainable == [] and read.time_ratios == [1.0]
    assert "trainable" not in script.markdown_table([read])


# ----------------------------------------------------------------------------------------------------------------------
# Deterministic measures: FLOPs and peak tensor bytes of a step
# ----------------------------------------------------------------------------------------------------------------------
def test_flop_counter_counts_a_linear_forward_and_backward():
    """y = x W^T + b, x [3, 8], W [4, 8]: forward 2*3*8*4 = 192 (addmm); backward grad x = g W: 2*3*4*8 = 192,
    grad W = g^T x: 2*4*3*8 = 192; 576 in all."""
    script = load_script()
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with script.flop_counter() as counter:
        linear(x).sum().backward()
    assert counter.get_total_flops() == 576
    # Without x's gradient, the backward computes grad W only
    with script.flop_counter() as counter:
        linear(x.detach()).sum().backward()
    assert counter.get_total_flops() == 384


def test_flop_counter_counts_the_fused_lm_head_backward_and_cpu_attention():
    """TRL's fused LM head accumulates its backward GEMMs with an in-place `addmm_`, and SDPA on the CPU runs a kernel
    torch's registry leaves out: both are counted by the script's counter, not by torch's alone."""
    from torch.utils.flop_counter import FlopCounterMode
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    script = load_script()
    n, h, v = 5, 8, 16
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))

    def head():
        log_probs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4)[0]
        log_probs.sum().backward()

    projection = 2 * n * h * v
    with script.flop_counter() as counter, script.UncountedProducts(counter, head_numel=v * h) as audit:
        head()
    # forward projection, its recomputation in the backward, grad hidden, grad weight
    assert counter.get_total_flops() == 4 * projection
    # every product reads a vocabulary chunk of the weight (4 rows of 16) or writes one of its gradient
    assert audit.vocab_flops == 4 * projection and audit.names == set()
    with script.flop_counter() as counter, script.UncountedProducts(counter, head_numel=v * h) as audit:
        hidden @ torch.randn(h, 3)  # reads no head weight
    assert audit.vocab_flops == 0 and counter.get_total_flops() == 2 * n * h * 3
    with FlopCounterMode(display=False) as plain:
        head()
    assert plain.get_total_flops() == 2 * projection  # torch alone misses both gradient GEMMs

    b, heads, s, d = 2, 3, 6, 4
    q, k, val = (torch.randn(b, heads, s, d, requires_grad=True) for _ in range(3))
    with script.flop_counter() as counter, script.UncountedProducts(counter) as uncounted:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, val, is_causal=True)
    # q k^T and (attention) v, each 2*b*heads*s*s*d, counted dense as torch counts its CUDA kernels
    assert counter.get_total_flops() == 2 * (2 * b * heads * s * s * d)
    assert uncounted.names == set()
    with script.flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() > 0


def test_uncounted_products_reports_a_product_without_a_formula():
    script = load_script()
    with script.flop_counter() as counter, script.UncountedProducts(counter) as uncounted:
        torch.randn(3, 4).addmm_(torch.randn(3, 5), torch.randn(5, 4))  # has a formula (the script's)
        torch.randn(3, 4).addbmm(torch.randn(2, 3, 5), torch.randn(2, 5, 4)).sum()  # has none
    assert uncounted.names == {"aten.addbmm"}
    assert counter.get_total_flops() == 2 * 3 * 5 * 4


def test_peak_tensor_bytes_on_a_hand_computed_sequence():
    """Allocations and frees with a known live total at each point; views, in-place ops and tensors made before the
    mode count nothing, and a storage freed only with its last view."""
    script = load_script()
    before = torch.zeros(1000)  # 4000 bytes, present before: never counted
    with script.PeakTensorBytes() as tracker:
        a = torch.empty(100, dtype=torch.float32)  # +400 -> 400
        b = torch.empty(50, dtype=torch.float64)  # +400 -> 800
        view = a[10:]  # a view: +0
        before.mul_(2)  # in place on a tensor from before: +0
        before_view = before[:10]  # +0
        del a  # alive through its view: 800
        c = torch.empty(25, dtype=torch.int32)  # +100 -> 900
        assert tracker.current == 900
        del view  # a's storage freed: 500
        assert tracker.current == 500
        del b  # 100
        d = before + 1  # a new 4000-byte result of an op on an old tensor: 4100
        d.add_(1)  # in place: +0
        assert tracker.current == 4100
        del d  # 100
        e = torch.empty(0)  # empty: +0, then grown in place to 30 floats: +120 -> 220
        torch.mm(torch.ones(5, 2), torch.ones(2, 6), out=e)  # the (5, 2) and (2, 6) inputs die at once: +40 +48 -88
        assert tracker.current == 100 + 120
        f = torch.empty(200, dtype=torch.bfloat16)  # +400 -> 620
    assert tracker.peak == 4100
    assert tracker.current == 620
    assert tracker.allocated == 400 + 400 + 100 + 4000 + 40 + 48 + 120 + 400
    assert before_view.shape == (10,) and c.numel() == 25 and e.shape == (5, 6) and f.numel() == 200


def test_peak_tensor_bytes_of_a_backward():
    """y = x @ w with x [4, 3] (requires grad), w [3, 5]: the forward keeps y (80 bytes); `y.sum()` (4) and its
    gradient (4, a scalar 1) come next, then the expanded ones of y's gradient (a broadcast view of that scalar: +0),
    then x's gradient g w^T (48 bytes) kept in x.grad; the peak is 80 + 4 + 4 + 48 at most, and x.grad is what stays.
    """
    script = load_script()
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 5)
    with script.PeakTensorBytes() as tracker:
        y = x @ w
        assert tracker.current == 4 * 5 * 4
        y.sum().backward()
        del y
    assert tracker.current == x.grad.untyped_storage().nbytes() == 4 * 3 * 4
    assert 4 * 5 * 4 + 4 * 3 * 4 <= tracker.peak <= 4 * 5 * 4 + 4 + 4 + 4 * 3 * 4


TINY = ["--vocab", "64", "--hidden", "32", "--layers", "1", "--seq-len", "16", "--batch-size", "2", "--steps", "2"]


def test_deterministic_mode_end_to_end(tmp_path):
    """`--measure deterministic`: one counted step per case, no timing. Plain sft through PrioritySFTTrainer does
    exactly TRL's work (FLOP ratio 1.0, and the same peak bytes); rho1's online reference forward adds FLOPs and
    reading it from the cache removes them; the CSV and the table carry the ratios, and --replot redraws them."""
    script = load_script()
    argv = [
        "--measure", "deterministic", "--methods", "sft,rho1", "--modes", "lora", "--references", "online,cached",
        *TINY, "--output-dir", str(tmp_path),
    ]  # fmt: skip
    results = script.main(argv)
    rows = {(r.case.method, r.case.reference): r for r in results}
    assert set(rows) == {("sft", "-"), ("rho1", "online"), ("rho1", "cached")}
    sft = rows[("sft", "-")]
    assert sft.flops > 0 and sft.peak_bytes > 0 and not sft.times
    assert sft.flop_ratios == [1.0] and sft.flops == sft.base_flops
    assert sft.peak_ratios == [1.0]
    assert rows[("rho1", "online")].flop_ratios[0] > 1.05  # the reference's forward, through the LM head
    assert rows[("rho1", "cached")].flop_ratios == [1.0]  # read from columns: no reference forward
    assert all(r.uncounted == "" for r in results)
    # The LM head: part of every step, TRL's own for sft; rho1's reference projects through its head too
    assert 0 < sft.lm_head_flops == sft.base_lm_head_flops < sft.flops
    assert rows[("rho1", "online")].lm_head_flops > sft.lm_head_flops

    with open(tmp_path / "overhead_deterministic.csv") as handle:
        csv_rows = {(row["method"], row["reference"]): row for row in csv.DictReader(handle)}
    assert csv_rows[("sft", "-")]["flop_ratio"] == "1.000000" and csv_rows[("sft", "-")]["step_time_s"] == ""
    assert int(csv_rows[("sft", "-")]["flops"]) == sft.flops
    table = (tmp_path / "overhead_deterministic.md").read_text()
    assert "| flop ratio | flop target | peak bytes ratio | peak bytes target |" in table
    assert "| lora | `sft` | - | 1.000 | met (≤ 1.05) | 1.000 | met (≤ 1.05) |" in table
    assert "time ratio" not in table and "- git commit: " in table
    assert not (tmp_path / "overhead.md").exists()

    replotted = script.main(["--replot", "--output-name", "overhead_deterministic", "--output-dir", str(tmp_path)])
    assert (tmp_path / "overhead_deterministic.md").read_text() == table
    assert [(r.flops, r.peak_bytes, r.base_flops) for r in replotted] == [
        (r.flops, r.peak_bytes, r.base_flops) for r in results
    ]


def test_counted_step_covers_the_lm_head_forward_and_backward(tmp_path):
    """The counted window holds the step's forward and backward: TRL's fused LM head projects the N = 2 x 15 positions
    that have a next token (2 * N * hidden * vocab FLOPs), once in the forward and once again in the backward, plus
    the hidden states' gradient (LoRA: the head is frozen, 3 projections) and the head's weight gradient (full
    fine-tuning: 4). A window without the backward would see 1 in both."""
    script = load_script()
    argv = ["--measure", "deterministic", "--methods", "sft", "--modes", "lora,full", "--full-methods", "all", *TINY]
    results = {r.case.mode: r for r in script.main([*argv, "--output-dir", str(tmp_path)])}
    projection = 2 * (2 * 15) * 32 * 64
    assert results["lora"].base_lm_head_flops == results["lora"].lm_head_flops == 3 * projection
    assert results["full"].base_lm_head_flops == results["full"].lm_head_flops == 4 * projection
    assert results["full"].flops > results["full"].lm_head_flops  # the backbone's products count too


def test_deterministic_targets():
    """The issue's targets for the four methods it names, any reference and mode; the time/memory targets otherwise."""
    script = load_script()
    cli = script.parse_args(
        ["--methods", "asft,target_sft,eaft,prift_mass,dft", "--modes", "lora,full", "--full-methods", "all"]
    )
    for r in script.build_cases(cli):
        expected = {"asft": 1.2, "target_sft": 1.2, "eaft": 1.05, "prift_mass": 1.05}.get(r.case.name)
        if expected is None:
            assert (r.flop_target, r.peak_target) == (r.time_target, r.memory_target) == (1.05, 1.05), r.case
        else:
            assert (r.flop_target, r.peak_target) == (expected, expected), r.case
    result = script.Result(script.Case("lora", "asft", "online"), "online reference", 1.4, 1.2, flop_target=1.2)
    result.flops, result.base_flops = 121, 100
    assert script.verdict(result.flop_ratios, result.flop_target) == "missed (≤ 1.2)"
    result.flops = 120
    assert script.verdict(result.flop_ratios, result.flop_target) == "met (≤ 1.2)"
