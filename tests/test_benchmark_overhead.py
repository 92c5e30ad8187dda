"""Smoke test of scripts/benchmark_overhead.py on a toy size: it writes its table, CSV and chart, with finite ratios.

Not a timing test: the ratios of a toy model on a shared machine mean nothing, only that they are measured.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path


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
