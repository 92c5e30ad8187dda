"""Stopping and resuming from the command line: a stop is agreed by every process at a step boundary, the exit code
says stop (130 / 143) or failure, and `--resume_from_checkpoint true` resumes from the last checkpoint.

Each test failed on the code before (named in its docstring).
"""

from __future__ import annotations

from pathlib import Path

from trl_priority.scripts import sft


REPOSITORY = Path(__file__).resolve().parents[1]
RECIPE = REPOSITORY / "recipes" / "sft.yaml"


def _parse(*overrides: str):
    return sft.make_parser().parse_args_and_config(["--config", str(RECIPE), *overrides])


def test_resume_from_checkpoint_true_resumes_from_the_last_checkpoint(tmp_path, model_dir):
    """`--resume_from_checkpoint true` reached `Trainer.train` as the string "true", a checkpoint path that does not
    exist ("Can't find a valid checkpoint at true")."""
    settings = [
        "--model_name_or_path", model_dir(seed=0), "--output_dir", str(tmp_path), "--max_length", "256",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--disable_tqdm", "true",
        "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
    ]  # fmt: skip
    first = sft.main(*_parse(*settings, "--max_steps", "2"))
    assert first.state.global_step == 2 and (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    written = (tmp_path / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    resumed = sft.main(*_parse(*settings, "--max_steps", "3", "--resume_from_checkpoint", "true"))
    assert resumed.state.global_step == 3
    # Steps 1-2 not trained again: a fresh run would have written checkpoint-2 anew
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == written
    assert sft.resume_target("false") is None and sft.resume_target("ckpt/checkpoint-2") == "ckpt/checkpoint-2"
