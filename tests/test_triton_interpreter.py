"""TRL's Triton branch of the fused LM head, with the package's statistics riding on it, against the torch branch.

On CUDA, TRL's fused head scores only the supervised positions and folds every projected tile with a Triton kernel;
`trl_priority.statistics._LogProbWithStatistics` subclasses that function and computes the package's own statistics
(`mass`, `topk_entropy`, ...) from the same tiles. No GPU is needed to run that branch: Triton's interpreter
(`TRITON_INTERPRET=1`) runs the kernels on CPU tensors. `tests/triton_statistics_worker.py` (a process of its own,
since triton reads the variable when imported) computes the statistics and the gradients on both branches of the same
tiny model and batch; here they must agree to float32 tolerance. Skipped, with the reason, where triton is not
installed or its interpreter cannot run TRL's kernel.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def branches(tmp_path_factory) -> dict[str, torch.Tensor]:
    # triton in the environment, or in a folder of its own that only the worker sees (`TRL_PRIORITY_TRITON_PATH`,
    # as .ci/run installs it: importable in this process, triton would change how TRL compiles its kernels)
    triton_path = os.environ.get("TRL_PRIORITY_TRITON_PATH", "")
    in_folder = bool(triton_path) and (Path(triton_path) / "triton").is_dir()
    if importlib.util.find_spec("triton") is None and not in_folder:
        pytest.skip("triton is not installed (pip install triton): No module named 'triton'")
    output = tmp_path_factory.mktemp("triton") / "branches.safetensors"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    if in_folder:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_path, env.get("PYTHONPATH", "")]))
    command = [sys.executable, "tests/triton_statistics_worker.py", "--output", str(output)]
    done = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 3:  # the worker's "cannot run here", with triton's own error
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, f"the Triton worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return load_file(str(output))


def test_triton_branch_ran_the_kernels_and_the_tiles_served_the_statistics(branches):
    # Control: the Triton branch did run TRL's kernels (the torch branch none), so the equality below compares the
    # two branches, not the torch branch with itself; and the fused head's tiles served every statistic on both
    assert branches["torch.kernel_calls"].item() == 0
    assert branches["triton.kernel_calls"].item() > 0
    assert branches["torch.fallback_passes"].item() == 0 and branches["triton.fallback_passes"].item() == 0


@pytest.mark.parametrize("name", ["logps", "entropy", "mass", "topk_entropy", "log_probs_output"])
def test_triton_branch_statistics_equal_the_torch_branch(branches, name):
    mask = branches["mask"]
    torch_value, triton_value = branches[f"torch.{name}"], branches[f"triton.{name}"]
    assert torch_value.shape == mask.shape
    assert (torch_value[mask] != 0).any()  # something was computed at the supervised positions
    assert (triton_value[~mask] == 0).all()  # and nothing where there is no label
    torch.testing.assert_close(triton_value, torch_value, rtol=1e-5, atol=1e-5)


def test_triton_branch_gradients_equal_the_torch_branch(branches):
    names = [key.removeprefix("torch.") for key in branches if key.startswith("torch.grad.")]
    assert len(names) > 10
    for name in names:
        torch.testing.assert_close(branches[f"triton.{name}"], branches[f"torch.{name}"], rtol=1e-5, atol=1e-5)
