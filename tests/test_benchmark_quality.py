"""scripts/benchmark_quality.py on the tiny model and the GSM8K-shaped files of conftest: no SmolLM2, seconds."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import QUESTIONS
from trl_priority.tools.token_scores import tokenize_like_trainer


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_quality.py"


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_quality"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gsm8k_dir(gsm8k_dir):
    """conftest's GSM8K folder with example_model_solutions.jsonl grown to 20 distinct test questions (its 8, then
    again with ' (test i)'), so that the file's three parts (rows 0-7, 8-13, 14-19) hold the small slices below."""
    path = Path(gsm8k_dir, "example_model_solutions.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    grown = [
        {**rows[i % 8], "question": rows[i % 8]["question"] + (f" (test {i})" if i >= 8 else "")} for i in range(20)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in grown))
    return gsm8k_dir


# Slices small enough for a 1-step run of the tiny model
SMALL_SIZES = (
    "--train-size", "10", "--eval-size", "4", "--unlearn-train-size", "2", "--unlearn-eval-size", "2",
    "--generate", "2", "--max-new-tokens", "4", "--max-length", "64", "--resamples", "200",
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
    # held out: the first 4 test problems, each with a corrupted copy; the ground truth's 'A: N' written '#### N'
    assert record["heldout_rows"] == [0, 1, 2, 3]
    assert len(evalset.clean) == len(evalset.corrupt) == 4
    assert all(c.input_ids != w.input_ids for c, w in zip(evalset.clean, evalset.corrupt))
    assert tokenizer.decode(evalset.clean[0].input_ids).endswith("3 + 4 = 7 apples.\n#### 7<|im_end|>")
    assert record["results"] == 8  # one '=' and one '####' result per problem
    # unlearn task: 2 questions x (ground truth, wrong) from the file's second part (rows 8-13)
    unlearn = tasks[1].rows
    assert unlearn["unlearn"] == [0.0, 1.0, 0.0, 1.0]
    assert [r["prompt"][0]["content"] for r in unlearn][::2] == [
        QUESTIONS[0][0] + " (test 8)",
        QUESTIONS[1][0] + " (test 9)",
    ]
    assert evalset.questions == [QUESTIONS[0][0], QUESTIONS[1][0]]  # generated: the first held-out problems
    assert evalset.answers == [7.0, 12.0]


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
    reference (trained first), and a signed method on the unlearn task next to its TRL control."""
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
            "trl_sft,forgetting_data",
            "--seeds",
            "0,1",
            "--steps",
            "1",
            *SMALL_SIZES,
        ]
    )
    runs = json.loads((out / "quality.json").read_text())["runs"]
    assert len(runs) == 1 + 2 * 5 and runs == result["runs"]
    assert {r["method"] for r in runs if "`noise`" in r["reads"]} == {"robustft"}
    noisy = next(r for r in runs if r["method"] == "trl_sft")
    metrics = noisy["metrics"]
    assert set(metrics) == {"nll_clean", "nll_corrupt", "margin", "pref", "result_acc", "answer_acc"}
    assert metrics["margin"] == pytest.approx(metrics["nll_corrupt"] - metrics["nll_clean"])
    # the per-problem values the bootstrap resamples: one per held-out problem, pooled into the metrics
    per = noisy["per_problem"]
    assert [len(per[k]) for k in ("nll_clean", "nll_corrupt", "result_hits", "results", "answer_right")] == [4] * 4 + [
        2
    ]
    assert metrics["result_acc"] == sum(per["result_hits"]) / sum(per["results"])
    unlearn = next(r for r in runs if r["task"] == "unlearn")["metrics"]
    assert set(unlearn) == {"unlearn_nll_correct", "unlearn_margin", "unlearn_pref", "answer_acc"}
    table = (out / "quality.md").read_text()
    assert "| base (untrained) |" in table and "| forgetting_data [unlearn: + wrong] |" in table
    assert "| rho1 | reference: SFT on the clean rows |" in table
    values, diffs = table.split("Difference to `trl_sft`")
    rows = [line for line in values.splitlines() if line.startswith("| ")][1:]
    # two seeds: a spread on each trained row's shown metrics (5 noisy, 3 unlearn), none on the base (evaluated once)
    assert [row.count("±") for row in rows] == [0, 5, 5, 5, 3, 3]
    # differences: the base on all 7 columns, robustft on its task's 5, forgetting_data on 3; trl_sft is the
    # reference of both tasks
    rows = {line.split(" | ")[0]: line for line in diffs.splitlines() if line.startswith("| ")}
    intervals = {
        name: len(re.findall(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", row)) for name, row in rows.items()
    }
    assert intervals["| base (untrained)"] == 7 and intervals["| robustft"] == 5 and intervals["| rho1"] == 5
    assert intervals["| forgetting_data [unlearn: + wrong]"] == 3
    assert rows["| trl_sft"].count("reference") == 5
    assert rows["| trl_sft [unlearn: correct only]"].count("reference") == 3
    summary = {(r["task"], r["method"]): r for r in result["summary"]}
    margin = summary[("noisy", "robustft")]["differences"]["margin"]
    assert margin["low"] <= margin["diff"] <= margin["high"]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_computed_columns_line_up_with_the_tokens(bq, gsm8k_dir, tmp_path, tokenizer, model_dir):
    """Critical Tokens' contrastive score (from models trained on the clean and on the corrupted rows first), their
    counterfactual impact and T-SHIRT's information gain: one value per token of the trainer's input_ids, next to the
    `unlearn` record."""
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
    counterfactual = bq.dataset_for("critical_counterfactual", tasks[0], cli, 0, prepared)
    assert counterfactual.column_names == ["prompt", "completion", "counterfactual_impact"]
    columns = (
        ("contrastive_score", critical),
        ("information_gain", tshirt),
        ("counterfactual_impact", counterfactual),
    )
    for name, dataset in columns:
        assert [len(v) for v in dataset[name]] == [len(ids) for ids in tokens["input_ids"]]


def test_a_method_the_task_cannot_feed_is_refused_before_any_run(bq, gsm8k_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        small_args(bq, gsm8k_dir, tmp_path, "--unlearn-methods", "robustft")
    assert "reads the column(s) ['noise'], which the unlearn task does not have" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The paired bootstrap
# ----------------------------------------------------------------------------------------------------------------
def naive_bootstrap(run, reference, resamples, seed):
    """The paired bootstrap of one seed per run, written as a loop from its definition: draw n problems with
    replacement, the same for both runs, and recompute each metric as Σ num / Σ den on them."""
    rng = np.random.default_rng(seed)
    (num_a, den_a), (num_b, den_b) = run, reference
    n = len(num_a)
    diffs = []
    for _ in range(resamples):
        drawn = rng.integers(0, n, size=n)
        diffs.append(sum(num_a[drawn]) / sum(den_a[drawn]) - sum(num_b[drawn]) / sum(den_b[drawn]))
    return np.percentile(diffs, [2.5, 97.5])


def test_paired_bootstrap_identical_runs_give_exactly_zero(bq):
    values = np.array([[1.2, 0.7, 3.1, 2.2, 0.4]])  # (S=1, n=5)
    parts = (values, np.ones_like(values))
    assert bq.paired_bootstrap(parts, parts, resamples=500) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_constant_shift_gives_the_shift(bq):
    """A run worse by exactly 0.25 on every problem: the difference and both ends of the interval are 0.25, however
    spread the problems are (the pairing removes their spread)."""
    reference = np.array([[1.2, 0.7, 3.1, 2.2, 0.4, 5.0]])
    ones = np.ones_like(reference)
    diff, low, high = bq.paired_bootstrap((reference + 0.25, ones), (reference, ones), resamples=500)
    assert diff == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_paired_bootstrap_matches_a_naive_loop_on_pooled_accuracy(bq):
    """Result accuracy pooled as Σ hits / Σ results: the vectorised bootstrap equals the loop with the same RNG."""
    rng = np.random.default_rng(1)
    results = rng.integers(1, 8, size=30).astype(float)
    hits_a = np.minimum(results, rng.integers(0, 8, size=30)).astype(float)
    hits_b = np.minimum(results, rng.integers(0, 8, size=30)).astype(float)
    diff, low, high = bq.paired_bootstrap((hits_a[None], results[None]), (hits_b[None], results[None]), 1000, seed=7)
    assert diff == pytest.approx(hits_a.sum() / results.sum() - hits_b.sum() / results.sum())
    expected = naive_bootstrap((hits_a, results), (hits_b, results), 1000, seed=7)
    assert [low, high] == pytest.approx(list(expected))
    assert low < diff < high


def test_paired_bootstrap_resolves_a_real_gap_and_not_noise(bq):
    """Hand-sized cases: a gain on 18 of 20 problems is resolved; gains and losses that cancel are not."""
    ones = np.ones((1, 20))
    reference = np.zeros((1, 20))
    mostly_better = np.array([[1.0] * 18 + [-1.0] * 2])
    _, low, _ = bq.paired_bootstrap((mostly_better, ones), (reference, ones), resamples=2000)
    assert low > 0
    cancelling = np.array([[1.0, -1.0] * 10])
    _, low, high = bq.paired_bootstrap((cancelling, ones), (reference, ones), resamples=2000)
    assert low < 0 < high


def test_paired_bootstrap_seeds_add_spread(bq):
    """Two seeds that agree add nothing; two seeds that disagree by a constant widen the interval to cover both."""
    problems = np.array([1.2, 0.7, 3.1, 2.2, 0.4, 5.0])
    ones = np.ones((2, 6))
    reference = (problems[None], ones[:1])
    agreeing = (np.stack([problems + 0.25, problems + 0.25]), ones)
    assert bq.paired_bootstrap(agreeing, reference, 500) == pytest.approx((0.25, 0.25, 0.25))
    disagreeing = (np.stack([problems + 0.0, problems + 0.5]), ones)
    diff, low, high = bq.paired_bootstrap(disagreeing, reference, 500)
    assert diff == pytest.approx(0.25) and low == pytest.approx(0.0) and high == pytest.approx(0.5)


def test_metrics_are_ratios_of_the_per_problem_sums(bq):
    per_problem = {"nll_clean": [1.0, 2.0], "nll_corrupt": [1.5, 1.0], "result_hits": [1, 3], "results": [2, 4]}
    assert bq.metrics_of(per_problem) == {
        "nll_clean": 1.5,
        "nll_corrupt": 1.25,
        "margin": -0.25,
        "pref": 0.5,
        "result_acc": 4 / 6,  # pooled: not the mean of 1/2 and 3/4
    }


# ----------------------------------------------------------------------------------------------------------------
# The split, the estimate, resumable runs
# ----------------------------------------------------------------------------------------------------------------
def test_the_test_file_splits_in_three_disjoint_parts(bq, gsm8k_dir, tmp_path, tokenizer):
    parts = bq.split_test_rows(1000)
    assert parts == {
        "noisy_heldout": range(0, 400),
        "unlearn_train": range(400, 700),
        "unlearn_heldout": range(700, 1000),
    }
    for n_rows in (8, 20, 999, 1000):
        parts = list(bq.split_test_rows(n_rows).values())
        assert sorted(i for part in parts for i in part) == list(range(n_rows))  # disjoint, and nothing left out
    # the questions of the three parts are disjoint too, and none is among the noisy task's training problems
    sizes = ("--unlearn-train-size", "6", "--unlearn-eval-size", "6", "--eval-size", "8")
    tasks, evalset, record = bq.build_data(small_args(bq, gsm8k_dir, tmp_path, *sizes), tokenizer, tmp_path)

    def questions(items):
        return {
            tokenizer.decode(item.input_ids).split("<|im_end|>")[0].removeprefix("<|im_start|>user\n")
            for item in items
        }

    heldout, unlearn_heldout = questions(evalset.clean), questions(evalset.correct)
    unlearn_train = {row["prompt"][0]["content"] for row in tasks[1].rows}
    noisy_train = {row["prompt"][0]["content"] for row in tasks[0].rows}
    assert len(heldout) == 8 and len(unlearn_train) == 6 and len(unlearn_heldout) == 6
    for a, b in [(heldout, unlearn_train), (heldout, unlearn_heldout), (unlearn_train, unlearn_heldout)]:
        assert a.isdisjoint(b)
    assert noisy_train.isdisjoint(heldout | unlearn_train | unlearn_heldout)
    assert record["test_split"] == {"noisy_heldout": [0, 7], "unlearn_train": [8, 13], "unlearn_heldout": [14, 19]}


def run_main(bq, model, gsm8k_dir, out, *extra):
    return bq.main(
        ["--model", model, "--data-dir", gsm8k_dir, "--output-dir", str(out), "--unlearn-methods", "", "--steps", "1",
         *SMALL_SIZES, *extra]
    )  # fmt: skip


def test_resume_keeps_finished_rows_and_skips_them(bq, gsm8k_dir, tmp_path, model_dir, monkeypatch):
    """A run killed in its third row keeps the two finished ones on disk (and a table of them); the rerun trains only
    what is missing; --force trains again, and the newest row wins."""
    model, out = model_dir(), tmp_path / "out"
    trained = []
    real_train = bq.train

    def train_then_die_on_robustft(method, *args, **kwargs):
        if method == "robustft":
            raise KeyboardInterrupt  # the run is killed here
        trained.append(method)
        return real_train(method, *args, **kwargs)

    monkeypatch.setattr(bq, "train", train_then_die_on_robustft)
    with pytest.raises(KeyboardInterrupt):
        run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft,robustft")
    lines = (out / "quality_runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["base", "trl_sft"]
    assert "| trl_sft |" in (out / "quality.md").read_text()

    def counted_train(method, *args, **kwargs):
        trained.append(method)
        return real_train(method, *args, **kwargs)

    monkeypatch.setattr(bq, "train", counted_train)
    result = run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft,robustft")
    assert trained == ["trl_sft", "robustft"]  # the rerun trained robustft only
    assert [r["method"] for r in result["runs"]] == ["base", "trl_sft", "robustft"]
    assert result["runs"][1] == json.loads(lines[1])  # the kept row itself

    result = run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft", "--force")
    assert trained == ["trl_sft", "robustft", "trl_sft"]
    assert len((out / "quality_runs.jsonl").read_text().splitlines()) == 5  # base and trl_sft again, appended
    assert [r["method"] for r in result["runs"]] == ["robustft", "base", "trl_sft"]  # one row each, newest last

    # other settings (a larger training slice) share no rows with these: everything is to be made again
    plan = run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft", "--dry-run", "--train-size", "12")
    assert plan["finished"] == [] and len(plan["todo"]) == 2
    # the base row was scored without the unlearn task: turning the task on makes it again, with the task's runs
    plan = run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft", "--unlearn-methods", "trl_sft", "--dry-run")
    assert plan["todo"] == [("base", "base", None), ("unlearn", "trl_sft", 0)]


def test_resume_skips_a_finished_composition(bq, gsm8k_dir, tmp_path):
    """A composition's row holds its recipe's priority_args, which the command does not repeat: the rerun skips it,
    and runs it again only when the command gives other priority_args."""
    cli = small_args(bq, gsm8k_dir, tmp_path, "--methods", "verified_prift", "--unlearn-methods", "")
    recipe_args = bq.COMPOSED["verified_prift"][1]
    assert recipe_args  # the recipe's own settings: what the finished row records
    finished = {("noisy", "verified_prift", 0): {"priority_args": recipe_args, "per_problem": {}}}
    assert bq.still_to_run(bq.plan_runs(cli), finished, cli, False) == [("base", "base", None)]
    other = small_args(
        bq, gsm8k_dir, tmp_path, "--methods", "verified_prift", "--priority-args", '{"verified_prift": {}}'
    )
    assert ("noisy", "verified_prift", 0) in bq.still_to_run(bq.plan_runs(other), finished, other, False)


def test_parallel_processes_fill_one_table(bq, gsm8k_dir, tmp_path, model_dir, monkeypatch):
    """Two processes with their own --output-dir, one of them --no-base, then their rows concatenated: the last run
    trains nothing and writes one table, with the second process's method measured against the first's trl_sft."""
    model = model_dir()
    trained = []
    real_train = bq.train

    def counted_train(method, *args, **kwargs):
        trained.append(method)
        return real_train(method, *args, **kwargs)

    monkeypatch.setattr(bq, "train", counted_train)
    first, second, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    run_main(bq, model, gsm8k_dir, first, "--methods", "trl_sft")
    run_main(bq, model, gsm8k_dir, second, "--methods", "robustft", "--no-base")
    assert trained == ["trl_sft", "robustft"]
    assert [json.loads(line)["method"] for line in (second / "quality_runs.jsonl").read_text().splitlines()] == [
        "robustft"
    ]  # no base row in the --no-base process
    merged.mkdir()
    (merged / "quality_runs.jsonl").write_text(
        (first / "quality_runs.jsonl").read_text() + (second / "quality_runs.jsonl").read_text()
    )
    result = run_main(bq, model, gsm8k_dir, merged, "--methods", "trl_sft,robustft")
    assert trained == ["trl_sft", "robustft"]  # nothing left to train
    assert [r["method"] for r in result["runs"]] == ["base", "trl_sft", "robustft"]
    robustft = next(row for row in result["summary"] if row["method"] == "robustft")
    assert "margin" in robustft["differences"]  # measured against the other process's trl_sft
    # a second seed of the reference alone, added later: each trained row says how many seeds it has
    run_main(bq, model, gsm8k_dir, merged, "--methods", "trl_sft", "--seeds", "1", "--no-base")
    values = (merged / "quality.md").read_text().split("Difference to")[0]
    assert "| trl_sft (2 seeds) |" in values and "| robustft (1 seed) |" in values and "| base (untrained) |" in values


def test_the_estimate_is_printed_and_counts_the_tokens_the_run_uses(
    bq, gsm8k_dir, tmp_path, model_dir, tokenizer, capsys
):
    """--dry-run prints the plan's estimate from the documented CPU constants and trains nothing; the run then
    records exactly the training and scored tokens the estimate counted, and the next estimate uses its own rates."""
    model, out = model_dir(), tmp_path / "out"
    plan = run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft,rho1", "--dry-run")
    printed = capsys.readouterr().out
    assert plan["todo"] == [("base", "base", None), ("noisy", "trl_sft", 0), ("noisy", "rho1", 0)]
    assert not (out / "quality_runs.jsonl").exists()
    line = next(line for line in printed.splitlines() if line.startswith("[estimate]"))
    assert "3 runs to make (3 trainings" in line  # trl_sft, rho1 and rho1's reference, trained first
    assert "at 53 training tokens/s" in line and "constants measured on a shared 2-core CPU" in line
    counted = {kind: int(n.replace(",", "")) for n, kind in re.findall(r"([\d,]+) (training|scored) tokens;", line)}

    runs = run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft,rho1")["runs"]
    # rho1's reference is trained first, on the 7 clean rows (3 of 10 corrupted): the estimate counts it too
    cli = small_args(bq, gsm8k_dir, tmp_path)
    noisy = bq.build_data(cli, tokenizer, tmp_path)[0][0]
    reference = bq.run_tokens(bq.sequence_tokens(tokenizer, bq.rows_of(noisy, "clean"), cli.max_length), cli)
    assert counted["training"] == runs[1]["train_tokens"] + runs[2]["train_tokens"] + reference
    assert 0 < reference != runs[1]["train_tokens"]
    assert counted["scored"] == sum(r["score_tokens"] for r in runs) > 0
    capsys.readouterr()
    run_main(bq, model, gsm8k_dir, out, "--methods", "trl_sft,rho1,robustft", "--dry-run")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[estimate]"))
    assert "1 runs to make" in line and "measured on 3 finished rows" in line
