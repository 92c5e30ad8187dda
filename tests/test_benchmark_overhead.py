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

    from trl_priority.structural import S2FTArgs, apply_s2ft

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
