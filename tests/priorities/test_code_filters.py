"""OpenCoder's heuristic code filters (`trl_priority.priorities.code_filters`): each filter on code made to pass and to fail
it, the stand-in classifier by hand, and the builtin:python-functions slice."""

from __future__ import annotations

import pytest
from datasets import Dataset

from trl_priority.priorities import code_filters as cf


GOOD = '''def area(width, height):
    """The area of a rectangle."""
    # both sides in the same unit
    product = width * height
    return product
'''

FAILING = {  # filter -> code that fails it (and only the thresholds' side of it matters)
    "max_line_length": GOOD + "x = '" + "a" * 1001 + "'\n",
    "mean_line_length": "a = 1\n" + ("b = '" + "c" * 300 + "'\n") * 3,
    "alphanumeric_fraction": "x = 1\n" + "#" + "-" * 200 + "\ny = 2\n",
    "auto_generated": "# This file is auto-generated. Do not edit.\n" + GOOD,
    "line_count": "def f():\n    return 1\n",
    "hex_data": "TABLE = [0xDEADBEEF, 0xCAFEBABE, 0x12345678, 0x0BADF00D]\nx = 1\ny = 2\n",
    "encoded_blob": "BLOB = '" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0123456789+/" * 4 + "'\nx = 1\ny = 2\n",
    "comment_ratio": "# one\n# two\n# three\n# four\n# five\nx = 1\n",
    "python_syntax": "def f(:\n    return\n    pass\n",
}


def test_good_code_passes_every_filter():
    assert cf.failed_filters(GOOD) == []


@pytest.mark.parametrize("name", sorted(FAILING))
def test_each_filter_rejects_what_it_describes(name):
    assert name in cf.failed_filters(FAILING[name])
    assert cf.FILTERS[name].fn(GOOD)


def test_registry_covers_the_documented_filters_and_refuses_duplicates():
    assert set(FAILING) == set(cf.FILTERS)
    with pytest.raises(ValueError, match="already exists"):
        cf.register_filter("line_count", "again")(lambda source: True)
    with pytest.raises(ValueError, match="Unknown code filter"):
        cf.failed_filters(GOOD, ["no_such_filter"])


def test_a_registered_filter_joins_the_column():
    try:
        cf.register_filter("no_print", "the code calls print")(lambda source: "print(" not in source)
        dataset = Dataset.from_dict({"prompt": ["a", "b"], "completion": [GOOD, GOOD + "print(area(1, 2))\n"]})
        assert cf.with_heuristics(dataset)["code_heuristics"] == [1.0, 0.0]
        assert cf.with_heuristics(dataset, filters=["line_count"])["code_heuristics"] == [1.0, 1.0]
    finally:
        cf.FILTERS.pop("no_print", None)


def test_fenced_code_is_what_gets_filtered():
    row = {"completion": [{"role": "assistant", "content": "Here it is:\n```python\n" + GOOD + "```\nDone."}]}
    assert cf.code_of(row) == GOOD


def test_proxy_quality_by_hand():
    assert cf.proxy_quality(GOOD) == 1.0  # parses, docstring, 3 statements, no marker
    assert cf.proxy_quality("def f():\n    return 1\n") == 0.5  # parses; no docstring; 1 statement; no marker
    assert cf.proxy_quality('def f():\n    """Doc."""\n    return 1  # TODO\n') == 0.5  # docstring; 2; marker
    assert cf.proxy_quality("x = 1\n") == 0.0 and cf.proxy_quality("def (:") == 0.0


def test_builtin_python_functions_slice():
    from trl_priority.tools.builtin import load_dataset

    dataset = load_dataset("builtin:python-functions")
    assert len(dataset) == 300
    assert {"prompt", "completion", "code_heuristics", "classifier"} <= set(dataset.column_names)
    row = dataset[0]
    assert row["completion"].startswith("def ") and row["prompt"].startswith("Write a Python function `")
    # the columns are the filters' and the stand-in's verdicts on each function
    for row in dataset.select(range(0, 300, 25)):
        assert row["code_heuristics"] == (0.0 if cf.failed_filters(row["completion"]) else 1.0)
        assert row["classifier"] == cf.proxy_quality(row["completion"])
    assert 0 < sum(dataset["code_heuristics"]) < len(dataset)  # some functions fail (too short ones)


def test_opencoder_recipe_trains_on_the_code_slice(tmp_path, model_dir):
    """The recipe on its own data (the generic recipe test swaps in GSM8K with placeholder columns)."""
    from pathlib import Path

    from trl_priority.scripts import sft

    recipe = Path(__file__).parents[2] / "recipes" / "opencoder.yaml"
    overrides = [
        "--model_name_or_path", model_dir(seed=0), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--max_length", "256", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    trainer = sft.main(*sft.make_parser().parse_args_and_config(["--config", str(recipe), *overrides]))
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    assert 0 < sum(log["priority/kept_fraction"] for log in logs) / 2 <= 1
