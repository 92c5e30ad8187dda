"""The policy's statistics on TRL's Triton branch, run by Triton's interpreter on the CPU (`tests/test_statistics.py`).

Not collected by pytest. On CUDA, TRL's fused head scores only the supervised positions and folds each projected tile
with a Triton kernel (`_forward_kernel`, `_backward_kernel`); `trl_priority.statistics._LogProbWithStatistics`
subclasses that function and computes the package's own statistics from the same tiles. Neither branch needs a GPU to
be run: with `TRITON_INTERPRET=1` set before triton is imported, TRL's kernels are `InterpretedFunction`s that run
on CPU tensors, and making TRL's `_use_triton` answer True selects the Triton branch on CPU tensors.

    TRITON_INTERPRET=1 python tests/triton_statistics_worker.py --output /tmp/triton.safetensors

writes, for the torch branch (`torch.*`) and the Triton branch (`triton.*`), the per-token statistics of a tiny model
(`logps`, `entropy`, `mass`, `topk_entropy`) and the gradients of Σ logps + 0.1·Σ entropy with respect to every
weight, plus `<branch>.kernel_calls` (how many times a Triton kernel ran: 0 on the torch branch, > 0 on Triton's)
and `<branch>.fallback_passes` (separate chunked passes run because the fused head's tiles did not serve the
statistics: 0 on both). Exits with status 3 and the error when triton's interpreter cannot run here.
"""

from __future__ import annotations

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

NAMES = ("logps", "entropy", "mass", "topk_entropy")


def fold_one_tile(trl_kernel, torch) -> None:
    """TRL's `_forward_kernel` on one (1, 8) tile, as its forward calls it."""
    running_max, max_before_target = torch.full((1,), -torch.inf), torch.full((1,), -torch.inf)
    sums = [torch.zeros(1) for _ in range(5)]  # sum_exp, x_sum_exp, sq_sum_exp, z_sum, target_logit
    flags = {f"HAS_{name.upper()}": True for name in trl_kernel.OPTIONAL_OUTPUTS}
    tile, targets = torch.randn(1, 8), torch.zeros(1, dtype=torch.long)
    trl_kernel._forward_kernel[(1,)](
        tile, tile.stride(0), targets, running_max, *sums[:4], max_before_target, sums[4], 0, 8,
        BLOCK_SIZE=trl_kernel._BLOCK_SIZE, logit_scale=1.0, softcap=1.0, inv_t=1.0, HAS_SOFTCAP=False, **flags,
    )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("Set TRITON_INTERPRET=1 before starting (triton reads it when it is imported).")

    import torch
    import trl.kernels.chunked_logprob as trl_kernel
    import trl.trainer.utils as trl_utils
    from safetensors.torch import save_file
    from trl.trainer.utils import add_fused_lm_head

    import trl_priority.statistics as priority_statistics
    from tests.conftest import build_model, build_tokenizer, prompt_completion_dataset
    from trl_priority.statistics import add_distribution_head, forward_statistics

    if not trl_kernel._TRITON_AVAILABLE:
        print("TRL did not find triton when it was imported: its kernels are plain torch functions.", file=sys.stderr)
        raise SystemExit(3)
    try:  # one fold of a tile by TRL's Triton kernel, interpreted: does the interpreter run at all here?
        fold_one_tile(trl_kernel, torch)
    except Exception as error:  # noqa: BLE001 - whatever stops the interpreter is the reason to skip
        print(f"Triton's interpreter cannot run TRL's kernel here: {type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(3) from error

    fallback = {"count": 0}
    distribution_pass = priority_statistics._distribution_pass

    def counted_pass(*a, **k):
        fallback["count"] += 1
        return distribution_pass(*a, **k)

    priority_statistics._distribution_pass = counted_pass

    calls = {"count": 0}

    def counted(kernel):  # `kernel[grid](...)` as TRL calls it, counting the launches
        class Counted:
            def __getitem__(self, grid):
                def launch(*a, **k):
                    calls["count"] += 1
                    return kernel[grid](*a, **k)

                return launch

        return Counted()

    trl_kernel._forward_kernel = counted(trl_kernel._forward_kernel)
    trl_kernel._backward_kernel = counted(trl_kernel._backward_kernel)

    tokenizer = build_tokenizer()
    rows = prompt_completion_dataset(3)
    texts = [prompt + completion for prompt, completion in zip(rows["prompt"], rows["completion"])]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :5] = -100  # a prompt: some positions not supervised, so the Triton branch scores fewer rows
    batch["labels"] = labels

    results = {}
    for branch, use_triton in (("torch", False), ("triton", True)):
        # TRL looks `_use_triton` up in both modules at call time; the package through `trl.kernels.chunked_logprob`
        trl_kernel._use_triton = trl_utils._use_triton = lambda device, use=use_triton: use
        calls["count"] = fallback["count"] = 0
        model = build_model(tokenizer, seed=0)
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        add_distribution_head(model)
        outputs, statistics = forward_statistics(model, dict(batch), NAMES, {"k": 8})
        (outputs.log_probs.sum() + 0.1 * outputs.entropy.sum()).backward()
        for name in NAMES:
            results[f"{branch}.{name}"] = statistics[name].detach().float().clone()
        results[f"{branch}.log_probs_output"] = outputs.log_probs.detach().float().clone()
        for name, param in model.named_parameters():
            results[f"{branch}.grad.{name}"] = param.grad.detach().float().contiguous()
        results[f"{branch}.kernel_calls"] = torch.tensor([calls["count"]])
        results[f"{branch}.fallback_passes"] = torch.tensor([fallback["count"]])
    results["mask"] = (labels[:, 1:] != -100).contiguous()
    save_file(results, args.output)


if __name__ == "__main__":
    main()
