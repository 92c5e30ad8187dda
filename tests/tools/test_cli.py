"""The `trl-priority` CLI and the recipes: every recipe parses and trains two steps on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QLORA_HIDDEN_SIZE
from trl_priority import available_priorities, get_priority
from trl_priority.scripts import sft
from trl_priority.tools.cli import describe_priorities, main


RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
# Recipes whose header says "Tested in tests/<file>" (DPO, vision-language) are parsed and trained there
TRAINED_HERE = [recipe for recipe in RECIPES if "# Tested in tests/" not in recipe.read_text()]
# Recipes that are not named after their method
NOT_A_METHOD = {"quickstart", "rho1_reference", "token_cleaning_reference"}
# A method's recipe in another setting (its own recipe is `<method>.yaml`), or a composition: recipe -> `priority`
VARIANTS = {
    "qlora": "prift_prob",
    "verified_prift": {"product": ["verifier", "prift_prob"]},
    "s2ft": "sft",  # sft with a structural priority (S2FT)
}


def parse(recipe: Path, *overrides: str):
    return sft.make_parser().parse_args_and_config(["--config", str(recipe), *overrides])


def test_every_registered_method_has_a_recipe():
    names = {recipe.stem for recipe in RECIPES}
    assert set(available_priorities()) <= names


@pytest.mark.parametrize("recipe", TRAINED_HERE, ids=lambda path: path.stem)
def test_recipe_parses_and_names_its_method(recipe):
    script_args, training_args, model_args, _ = parse(recipe)
    if recipe.stem not in NOT_A_METHOD:
        assert training_args.priority == VARIANTS.get(recipe.stem, recipe.stem)
    get_priority(training_args.priority).resolve_args(training_args.priority_args)
    assert model_args.model_name_or_path.startswith("builtin:")
    assert script_args.dataset_name.startswith("builtin:")
    header = recipe.read_text().splitlines()[0]
    assert header.startswith(f"# {recipe.stem}:")
    assert "Run: trl-priority sft --config recipes/" in recipe.read_text()


def example_columns(method) -> list[str]:
    """The example-level data columns a method reads that the dataset must bring (not made by TRL or the trainer)."""
    from trl_priority.statistics import DATA_STATISTICS

    specs = [DATA_STATISTICS[name] for name in method.statistics_from("data")]
    return [spec.column for spec in specs if spec.level == "example" and not spec.generated]


def token_columns(method) -> list[str]:
    """The token-level data columns a method reads that the dataset must bring (scores computed offline)."""
    from trl_priority.statistics import DATA_STATISTICS

    specs = [DATA_STATISTICS[name] for name in method.statistics_from("data")]
    made_by_trl = {"completion_mask"}  # `response_mask`: TRL's tokenization makes it
    return [s.column for s in specs if s.level == "token" and not s.generated and s.column not in made_by_trl]


def gsm8k_with_columns(folder: Path, columns: list[str], tokens: list[str] = (), model_path: str = "") -> str:
    from trl_priority.tools.builtin import load_gsm8k

    dataset = load_gsm8k(limit=8)
    for column in columns:
        dataset = dataset.add_column(column, [i % 2 for i in range(len(dataset))])
    if tokens:  # deterministic placeholders in [0, 1], one per token of the input_ids the trainer will make: the
        # recipe test checks that the method trains on its column; the scores themselves are tested against the
        # models in tests/priorities (token_scores' functions)
        from transformers import AutoTokenizer

        from trl_priority.tools.token_scores import tokenize_like_trainer

        tokenized = tokenize_like_trainer(dataset, AutoTokenizer.from_pretrained(model_path))
        lengths = [len(ids) for ids in tokenized["input_ids"]]
        for column in tokens:
            dataset = dataset.add_column(column, [[(i + j) % 5 / 4 for j in range(n)] for i, n in enumerate(lengths)])
    folder.mkdir()
    dataset.to_json(folder / "train.jsonl")
    return str(folder)


@pytest.mark.parametrize("recipe", TRAINED_HERE, ids=lambda path: path.stem)
def test_recipe_trains_two_steps_on_a_tiny_model(recipe, tmp_path, model_dir):
    model = model_dir(seed=0, hidden_size=QLORA_HIDDEN_SIZE if "4bit" in recipe.read_text() else 32)
    overrides = [
        "--model_name_or_path", model,
        "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2",
        "--max_length", "1024",  # the tiny tokenizer spends many tokens on GSM8K text
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    method = get_priority(parse(recipe)[1].priority)
    if method.reference == "explicit":  # the method needs a trained reference: a second tiny model stands in
        overrides += ["--ref_model_name_or_path", model_dir(seed=1)]
    columns, tokens = example_columns(method), token_columns(method)
    if columns or tokens:  # the built-in GSM8K lacks them: its first problems, saved with the columns
        overrides += ["--dataset_name", gsm8k_with_columns(tmp_path / "data", columns, tokens, model)]
    trainer = sft.main(*parse(recipe, *overrides))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2
    saved = tmp_path / "run"
    assert (saved / "adapter_model.safetensors").is_file() or (saved / "model.safetensors").is_file()


def test_recipe_errors_fail_at_parse_time(tmp_path):
    bad_method = tmp_path / "bad.yaml"
    bad_method.write_text("model_name_or_path: x\npriority: rho\n")
    with pytest.raises(ValueError, match="Did you mean 'rho1'"):
        parse(bad_method)
    bad_arg = tmp_path / "bad_arg.yaml"
    bad_arg.write_text("model_name_or_path: x\nbf16: false\npriority: rho1\npriority_args:\n  ratio: 1.5\n")
    with pytest.raises(ValueError, match=r"ratio=1.5 is outside \(0, 1\]"):
        parse(bad_arg)
    # Overrides on the command line are JSON
    _, training_args, _, _ = parse(bad_arg, "--priority_args", '{"ratio": 0.5}')
    assert training_args.priority_args == {"ratio": 0.5}


def test_list_shows_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for row in describe_priorities():
        assert row["method"] in out and row["paper"] in out
    assert {row["method"] for row in describe_priorities()} == set(available_priorities())
    rho1 = next(row for row in describe_priorities() if row["method"] == "rho1")
    assert rho1["regime"] == "hard" and rho1["source"] == "reference"
    assert rho1["needs"] == "trained reference, top-fraction selection"
    assert rho1["defaults"] == "ratio=0.6, scope=step"


def test_sft_command_launches_through_accelerate(tmp_path, model_dir):
    """The installed console script, end to end: parse, `accelerate launch`, train, save."""
    recipe = Path(__file__).parents[2] / "recipes" / "dft.yaml"
    command = [
        sys.executable, "-m", "trl_priority.tools.cli", "sft", "--config", str(recipe),
        "--model_name_or_path", model_dir(seed=0),
        "--output_dir", str(tmp_path / "launched"),
        "--max_steps", "1", "--max_length", "1024", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--num_processes", "1",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "launched" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "where, message",
    [
        ("recipe", "unknown setting 'prioirty_args' in the recipe. Did you mean 'priority_args'?"),
        ("flag", "unknown setting 'learnig_rate' in the command line. Did you mean 'learning_rate'?"),
    ],
)
def test_misspelt_settings_are_named_before_launch(where, message, tmp_path, capsys):
    recipe = Path(__file__).parents[2] / "recipes" / "dft.yaml"
    argv = ["sft", "--config", str(recipe)]
    if where == "recipe":
        bad = tmp_path / "bad.yaml"
        bad.write_text(recipe.read_text() + "\nprioirty_args: {}\n")
        argv = ["sft", "--config", str(bad)]
    else:
        argv += ["--learnig_rate", "1e-4"]
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert message in str(error.value)


def test_a_signal_to_the_command_stops_training_cleanly_and_the_last_checkpoint_resumes(tmp_path, model_dir):
    import signal
    import time

    from trl_priority.tools.cli import _children

    recipe = Path(__file__).parents[2] / "recipes" / "sft.yaml"
    output = tmp_path / "run"
    settings = [
        "--model_name_or_path", model_dir(seed=0), "--output_dir", str(output), "--max_length", "1024",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--disable_tqdm", "true",
        "--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type", "constant",
    ]  # fmt: skip
    command = [sys.executable, "-m", "trl_priority.tools.cli", "sft", "--config", str(recipe), *settings]
    command += ["--max_steps", "500", "--num_processes", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (output / "checkpoint-2" / "trainer_state.json").exists():
            assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.5)
        training = _children(process.pid)
        assert training, "accelerate launch started no training process"
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "Stopped by SIGTERM" in log
    time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in training), "the training process was left running"
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    last = checkpoints[-1]
    assert (last / "trainer_state.json").is_file()
    step = int(last.name.split("-")[1])
    resumed_settings = [*settings, "--max_steps", str(step + 1), "--resume_from_checkpoint", str(last)]
    trainer = sft.main(*parse(recipe, *resumed_settings))
    assert trainer.state.global_step == step + 1


README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_method_table_lists_every_method():
    for name in available_priorities():
        assert f"| `{name}` |" in README, name


def test_readme_custom_priority_example_runs(tokenizer, make_model, datasets_, make_args):
    import torch

    from trl_priority import PrioritySFTTrainer
    from trl_priority.priorities import registry

    block = README.split("## Your own priority")[1].split("```python")[1].split("```")[0]
    try:
        exec(compile(block, "README.md", "exec"), {})
        args = make_args(priority="confident_and_uncertain", priority_args={"min_prob": 0.001})
        trainer = PrioritySFTTrainer(
            model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
        )
        trainer.train()
        phi = trainer.token_priorities(trainer.train_dataset.select(range(2)))
        assert set(phi.unique().tolist()) <= {0.0, 1.0} and phi.dtype == torch.float32
    finally:
        registry._REGISTRY.pop("confident_and_uncertain", None)


def test_readme_method_table_is_in_sync_with_the_registry():
    """Every registered method has a README row with its registry regime, and every row is a registered method."""
    table = README.split("## Methods")[1].split("\n\n")[1]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    assert set(rows) == set(available_priorities())
    for name, regime in rows.items():
        assert regime == get_priority(name).regime, name
