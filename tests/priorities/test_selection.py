"""Top-fraction selection across processes: two ranks select together what one process selects over both."""

from __future__ import annotations

import torch

from trl_priority.priorities.selection import num_kept, select_in_batch, select_over_step, top_fraction


class FakeAccelerator:
    """Two processes' `gather` and `pad_across_processes`, for the rank `process_index`, from both ranks' tensors."""

    num_processes = 2

    def __init__(self, process_index: int, locals_: list[torch.Tensor]):
        self.process_index, self.locals = process_index, locals_

    def pad_across_processes(self, tensor, dim=0, pad_index=0.0):
        longest = max(local.numel() for local in self.locals)
        return torch.cat([tensor, torch.full((longest - tensor.numel(),), pad_index)])

    def gather(self, tensor):
        if tensor.numel() == 1 and tensor.dtype == torch.int64:  # the sizes
            return torch.tensor([local.numel() for local in self.locals])
        return torch.cat([self.pad_across_processes(local) for local in self.locals])


def test_two_ranks_select_what_one_process_selects_over_both():
    generator = torch.Generator().manual_seed(0)
    # Each rank has two micro-batches of its own, with different lengths and masks
    ranks = []
    for _ in range(2):
        scores = [torch.randn(2, 6, generator=generator), torch.randn(2, 4, generator=generator)]
        masks = [torch.rand(2, 6, generator=generator) > 0.3, torch.rand(2, 4, generator=generator) > 0.3]
        ranks.append((scores, masks))
    locals_ = [torch.cat([s[m] for s, m in zip(*rank)]) for rank in ranks]
    one_process = top_fraction(torch.cat(locals_), 0.4)

    selected = [select_over_step(*ranks[r], 0.4, FakeAccelerator(r, locals_)) for r in range(2)]
    together = torch.cat([torch.cat([sel[m] for sel, m in zip(selected[r], ranks[r][1])]) for r in range(2)])
    assert torch.equal(together, one_process)
    assert together.sum() == num_kept(0.4, together.numel())
    # Each rank alone would keep its own top 40%: another set
    alone = torch.cat([top_fraction(local, 0.4) for local in locals_])
    assert not torch.equal(alone, one_process)


def test_num_kept_rounds_half_up_and_keeps_at_least_one():
    assert [num_kept(0.5, n) for n in (0, 1, 2, 3, 5)] == [0, 1, 1, 2, 3]
    assert num_kept(0.01, 10) == 1 and num_kept(0.0, 10) == 0 and num_kept(1.0, 7) == 7


def test_nan_scores_are_kept_last():
    scores = torch.tensor([float("nan"), 1.0, 0.5])
    assert top_fraction(scores, 0.67).tolist() == [False, True, True]
    mask = torch.tensor([[True, True, False]])
    assert select_in_batch(torch.tensor([[0.1, 0.2, 9.0]]), mask, 0.5).tolist() == [[False, True, False]]
