"""Stopping and resuming from the command line: a stop is agreed by every process at a step boundary, the exit code
says stop (130 / 143) or failure, and `--resume_from_checkpoint true` resumes from the last checkpoint.

Each test failed on the code before (named in its docstring).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """Only rank 1 is sent SIGTERM, during step 3. Each process kept its own stop flag: rank 1 stopped after step 3
    while rank 0 went on into step 4's gradient all-reduce, where it waits for ever (NCCL) or fails once rank 1 has
    left (here, gloo: rank 0 never stopped cleanly and wrote no record). The stop is now agreed at the step end: both
    stop after step 3, on SIGTERM."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPOSITORY / "tests" / "stop_worker.py"), "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        log, _ = process.communicate()
        pytest.fail("the processes did not all stop: " + log.decode()[-3000:])
    records = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert records == [{"step": 3, "signal": signal.SIGTERM}] * 2, log.decode()[-3000:]


def test_the_command_exit_code_says_stop_or_failure():
    """Under torch elastic (`accelerate launch` with several processes) a stop or a failure reached the command as
    an elastic exception: a traceback and exit 1 whatever happened."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from trl_priority.tools.cli import launch_exit_code

    def failed(*codes):
        failures = {
            r: ProcessFailure(local_rank=r, pid=r + 1, exitcode=c, error_file="/nonexistent")
            for r, c in enumerate(codes)
        }
        return ChildFailedError("sft.py", failures)

    assert launch_exit_code(SignalException("stop", signal.SIGTERM)) == 143  # the command was sent SIGTERM
    assert launch_exit_code(SignalException("stop", signal.SIGINT)) == 130  # Ctrl-C
    assert launch_exit_code(failed(143, 143)) == 143  # the training processes were sent SIGTERM, and stopped
    assert launch_exit_code(failed(143, -9)) == 137  # one was killed: a failure, not a clean stop
    assert launch_exit_code(failed(1, 143)) == 1  # one raised
    assert launch_exit_code(subprocess.CalledProcessError(143, "sft")) == 143  # one process
    assert launch_exit_code(ValueError("not the launcher's")) is None


def test_precompute_on_two_processes_gathers_to_the_writer_only(tmp_path, make_model, tokenizer, datasets_, make_args):
    """`precompute-ref` gathered every process's values on every process (`gather_object`: ~52 GB per GPU for 100M
    tokens with top-k). Only the writer receives them now, in pieces, and writes each piece as it arrives: it never
    holds the dataset's values (before, it merged all 7 rows and handed them to `write_entry` at once: `handed` was
    [7]). The entry equals the one-process entry."""
    import torch

    from trl_priority import PrioritySFTTrainer

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPOSITORY / "tests" / "precompute_worker.py"), "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    writer, other = (record["handed"] for record in ranks)
    assert other == [] and max(writer) <= 2  # the writer: a piece of at most 2 rows at a time; the other: nothing
    assert sum(writer) == 7  # 4 rows per process: the other's last piece repeats its last row, sent once
    assert ranks[0]["key"] == ranks[1]["key"] and ranks[0]["ref_logps"] == ranks[1]["ref_logps"]

    (reference,) = (tmp_path / "models").iterdir()
    args = make_args(
        priority="prift_prob", ref_model_name_or_path=str(reference), per_device_train_batch_size=1,
        ref_cache_dir=str(tmp_path / "alone"),
    )  # fmt: skip
    alone = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(7), processing_class=tokenizer
    )
    assert alone.ref_cache_entries[0].key == ranks[0]["key"]
    for shared, own in zip(ranks[0]["ref_logps"], alone.train_dataset["ref_logps"], strict=True):
        torch.testing.assert_close(torch.tensor(shared), torch.tensor(own), atol=1e-5, rtol=1e-4)
