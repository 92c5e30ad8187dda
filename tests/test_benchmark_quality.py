"""scripts/benchmark_quality.py on the tiny model and the GSM8K-shaped files of conftest: no SmolLM2, seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trl_priority.token_scores import tokenize_like_trainer


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_quality.py"


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_quality"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# Slices small enough for a 1-step run of the tiny model
SMALL_SIZES = (
    "--train-size", "10", "--eval-size", "4", "--unlearn-train-size", "2", "--unlearn-eval-size", "2",
    "--generate-size", "2", "--max-new-tokens", "4", "--max-length", "64",
)  # fmt: skip


def small_args(bq, data_dir, tmp_path, *extra):
    return bq.parse_args(
        [
            "--data-dir",
            data_dir,
            "--output-dir",
            str(tmp_path / "out"),
            *SMALL_SIZES,
            "--steps",
            "1",
            *extra,
        ]
    )


def test_result_spans_and_hits_worked_by_hand(bq):
    solution = "She sold 48/2 = <<48/2=24>>24 clips, $<<3*4=1,200>>1,200 in all.\n#### 1,272"
    spans = bq.result_spans(solution)
    # the numbers after '=' (24 inside the annotation, 1,200) and after '####'; the copies after '>>' follow no '='
    assert [solution[s:e] for s, e in spans] == ["24", "1,200", "1,272"]
    # tokens: "2" "4" (24), "1,2" "00" (1,200), "1" ",272" (1,272), and an unscored prompt token over nothing
    at24 = solution.index("=24") + 1
    at1200 = solution.index("=1,200") + 1
    at1272 = solution.index("1,272")
    offsets = [(0, 3), (at24, at24 + 1), (at24 + 1, at24 + 2), (at1200, at1200 + 3), (at1200 + 3, at1200 + 5)]
    offsets += [(at1272, at1272 + 1), (at1272 + 1, at1272 + 5)]
    correct = [None, True, True, True, False, True, True]
    # 24: both tokens right; 1,200: its second token wrong; 1,272: both right -> 2 of 3
    assert bq.result_hits(offsets, correct, spans) == (2, 3)
    # a result whose tokens are not scored does not count either way
    assert bq.result_hits(offsets, [None, None, None, True, False, True, True], spans) == (1, 2)


def test_final_answer_and_margin(bq):
    assert bq.final_answer("so 3 + 4 = 7\n#### 1,234") == 1234.0
    assert bq.final_answer("#### 72\nThe answer is: 16") == 72.0  # the marker wins over the last number
    assert bq.final_answer("She has 5, then 7.5 left\nA: 7.5") == 7.5
    assert bq.final_answer("no digits here") is None
    # margin = mean(NLL wrong − NLL right): (2 − 1 + 1 − 1.5) / 2; the first pair prefers the right solution
    assert bq.nll_margin([2.0, 1.0], [1.0, 1.5]) == (0.25, 0.5)
    margin, pref = bq.nll_margin([0.5], [1.0])
    assert margin < 0 and pref == 0.0


def test_corruption_changes_results_and_records_rows(bq, gsm8k_dir, tmp_path, tokenizer):
    cli = small_args(bq, gsm8k_dir, tmp_path)
    tasks, evalset, record = bq.build_data(cli, tokenizer, tmp_path)
    noisy = tasks[0].rows
    clean = [json.loads(line)["answer"] for line in Path(gsm8k_dir, "train.jsonl").read_text().splitlines()]
    assert record["corrupted_rows"] == [i for i in range(10) if noisy[i]["noise"] == 1.0]
    assert len(record["corrupted_rows"]) == 3  # 30% of 10
    assert noisy["unlearn"] == noisy["noise"]  # the same record for the signed methods
    for i, row in enumerate(noisy):
        text = row["completion"][0]["content"]
        if i in record["corrupted_rows"]:
            assert bq.final_answer(text) != bq.final_answer(clean[i])
            # every result changed: the only calculation's result and the '####' line hold the final answer here
            results = [text[s:e] for s, e in bq.result_spans(text)]
            assert results and not set(results) & {clean[i][s:e] for s, e in bq.result_spans(clean[i])}
            assert row["made_up"] and all(text[s:e] in results for s, e in row["made_up"])
        else:
            assert text == clean[i] and row["made_up"] == []
    # held out: the last 4 problems, disjoint from the 10 trained on, each with a corrupted copy
    assert record["heldout_rows"] == [12, 13, 14, 15]
    assert len(evalset.clean) == len(evalset.corrupt) == 4
    assert all(c.input_ids != w.input_ids for c, w in zip(evalset.clean, evalset.corrupt))
    # unlearn task: 2 questions x (ground truth, wrong); scored on the second half of the 8 pairs
    unlearn = tasks[1].rows
    assert unlearn["unlearn"] == [0.0, 1.0, 0.0, 1.0]
    assert {r["prompt"][0]["content"] for r in unlearn}.isdisjoint(evalset.questions)
    assert evalset.answers == [24.0, 7.0]  # QUESTIONS[4:6]: the ground truths' 'A: N'


def test_scores_do_not_depend_on_batching(bq, make_model, tokenizer):
    model = make_model().eval()
    items = [bq.encode(tokenizer, q, a) for q, a in [("Tom has 3 apples.", "3 + 4 = 7\n#### 7"), ("Hi?", "#### 12")]]
    together = bq.score(model, items, tokenizer.pad_token_id, batch_size=2)  # padded to the longer one
    alone = [bq.score(model, [item], tokenizer.pad_token_id, batch_size=1)[0] for item in items]
    for (nll_a, ok_a), (nll_b, ok_b) in zip(together, alone):
        assert len(nll_a) == len(ok_a) > 0
        torch.testing.assert_close(torch.tensor(nll_a), torch.tensor(nll_b), atol=1e-5, rtol=1e-5)
        assert ok_a == ok_b


def test_a_run_with_learning_rate_zero_scores_as_the_base(bq, gsm8k_dir, tmp_path, tokenizer, model_dir):
    """The trained model is scored through the same path as the base: after PrioritySFTTrainer patched its forward
    and the adapter was merged, an untrained run must score exactly like the untouched base."""
    path = model_dir()
    cli = small_args(bq, gsm8k_dir, tmp_path, "--learning-rate", "0", "--model", path)
    tasks, evalset, _ = bq.build_data(cli, tokenizer, tmp_path)
    base = bq.AutoModelForCausalLM.from_pretrained(path)
    expected = bq.evaluate(base, tokenizer, evalset, ("noisy", "unlearn"), cli)
    dataset = bq.dataset_for("prift_prob", tasks[0], cli, 0, bq.Prepared(cli, path, tokenizer))
    trained = bq.train("prift_prob", dataset, cli, 0, path, tokenizer)
    assert bq.evaluate(trained, tokenizer, evalset, ("noisy", "unlearn"), cli) == expected


def test_main_writes_table_json_and_png(bq, gsm8k_dir, tmp_path, model_dir):
    """End to end, 1 step per run, two seeds: TRL's SFT, a method reading the noise record, a method needing a trained
    reference (trained first), and a signed method on the unlearn task."""
    out = tmp_path / "out"
    result = bq.main(
        [
            "--model",
            model_dir(),
            "--data-dir",
            gsm8k_dir,
            "--output-dir",
            str(out),
            "--methods",
            "trl_sft,robustft,rho1",
            "--unlearn-methods",
            "forgetting_data",
            "--seeds",
            "0,1",
            "--steps",
            "1",
            *SMALL_SIZES,
        ]
    )
    runs = json.loads((out / "quality.json").read_text())["runs"]
    assert len(runs) == 1 + 2 * 4 and runs == result["runs"]
    assert {r["method"] for r in runs if "`noise`" in r["reads"]} == {"robustft"}
    noisy = next(r for r in runs if r["method"] == "trl_sft")["metrics"]
    assert set(noisy) == {"nll_clean", "nll_corrupt", "margin", "pref", "result_acc", "answer_acc"}
    assert noisy["margin"] == pytest.approx(noisy["nll_corrupt"] - noisy["nll_clean"])
    unlearn = next(r for r in runs if r["task"] == "unlearn")["metrics"]
    assert set(unlearn) == {"unlearn_nll_correct", "unlearn_margin", "unlearn_pref", "answer_acc"}
    table = (out / "quality.md").read_text()
    assert "| base (untrained) |" in table and "| forgetting_data [unlearn: + wrong] |" in table
    assert "| rho1 | reference: SFT on the clean rows |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    # two seeds: a spread on each trained row's shown metrics (5 noisy, 3 unlearn), none on the base (evaluated once)
    assert [row.count("±") for row in rows] == [0, 5, 5, 5, 3]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_computed_columns_line_up_with_the_tokens(bq, gsm8k_dir, tmp_path, tokenizer, model_dir):
    """Critical Tokens' contrastive score (from models trained on the clean and on the corrupted rows first) and
    T-SHIRT's information gain: one value per token of the trainer's input_ids, next to the `unlearn` record."""
    path = model_dir()
    cli = small_args(bq, gsm8k_dir, tmp_path, "--model", path)
    tasks, _, _ = bq.build_data(cli, tokenizer, tmp_path)
    prepared = bq.Prepared(cli, path, tokenizer)
    tokens = tokenize_like_trainer(tasks[0].rows.select_columns(["prompt", "completion"]), tokenizer)
    critical = bq.dataset_for("critical", tasks[0], cli, 0, prepared)
    assert critical.column_names == ["prompt", "completion", "unlearn", "contrastive_score"]
    assert critical["unlearn"] == tasks[0].rows["noise"]
    assert set(prepared.models) == {("noisy", 0, "clean"), ("noisy", 0, "wrong")}
    tshirt = bq.dataset_for("tshirt", tasks[0], cli, 0, prepared)
    assert tshirt.column_names == ["prompt", "completion", "information_gain"]
    for name, dataset in (("contrastive_score", critical), ("information_gain", tshirt)):
        assert [len(v) for v in dataset[name]] == [len(ids) for ids in tokens["input_ids"]]


def test_a_method_the_task_cannot_feed_is_refused_before_any_run(bq, gsm8k_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        small_args(bq, gsm8k_dir, tmp_path, "--unlearn-methods", "robustft")
    assert "reads the column(s) ['noise'], which the unlearn task does not have" in capsys.readouterr().err
