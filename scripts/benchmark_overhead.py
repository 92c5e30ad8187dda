"""Overhead of each priority method against TRL's own SFTTrainer, measured in the same run.

For every method, the same model is trained on the same batches by `trl.SFTTrainer` (`loss_type="nll"`) and by
`PrioritySFTTrainer`, alternately, and the script prints the ratio of their median optimizer-step times and of their
peak memory (CUDA allocator peak on a GPU; on the CPU, the peak resident-set growth during training, sampled every
2 ms, which is coarse). Ratios, never absolute timings, are what to compare across machines.

    python scripts/benchmark_overhead.py                       # CPU default: a few minutes on 2 cores
    python scripts/benchmark_overhead.py --methods sft,dft,prift_prob --modes lora --repeats 3

The model is a Llama-shaped config with random weights and SmolLM2's vocabulary size (49,152): the LM head is where a
priority's costs appear. Data are random token ids with a prompt and a completion. Reference methods use their
default reference: the base with the adapter off (LoRA) or a frozen copy of the starting model (full fine-tuning);
`rho1` and `forgetting` are given a separate frozen model (they and the full fine-tuning reference methods therefore
hold a second copy of the weights, which the memory ratio includes). Methods with a differentiable full-distribution
term (`asft`, `target_sft`) must stay within 1.2x of SFT's peak memory: they never build `(batch, seq, vocab)` logits.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import threading
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_priority import PrioritySFTConfig, PrioritySFTTrainer, available_priorities, get_priority
from trl_priority.statistics import DATA_STATISTICS


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(vocab_size - 2)} | {"<pad>": vocab_size - 2, "<eos>": vocab_size - 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="<pad>", eos_token="<eos>"
    )


def make_dataset(n: int, prompt_len: int, completion_len: int, vocab_size: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(completion_len // 2, completion_len + 1, (n,), generator=generator).tolist()
    ids = [torch.randint(0, vocab_size - 2, (prompt_len + c,), generator=generator).tolist() for c in lengths]
    masks = [[0] * prompt_len + [1] * c for c in lengths]
    columns = {"input_ids": ids, "completion_mask": masks}
    # Methods that read an example-level column (RobustFT's noise, Forgetting's unlearn marks) get one: 0 and 1 in turn
    for spec in DATA_STATISTICS.values():
        if spec.level == "example" and not spec.generated:
            columns[spec.column] = [float(i % 2) for i in range(n)]
    return Dataset.from_dict(columns)


class StepTimer(TrainerCallback):
    """Wall time from one optimizer step's end to the next: everything a step costs, including what runs before
    `on_step_begin` (fetching the micro-batches and a step-wide selection's scoring pass)."""

    def __init__(self):
        self.times: list[float] = []
        self.last: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or sampled RSS growth on the CPU."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.value = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.value = self.peak - self.base


def run_once(method, lora, model, dataset, tokenizer, cli, output_dir):
    """Train `cli.steps` steps; return (median step time after the first, peak memory)."""
    common = dict(
        output_dir=output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=1e-4,
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=True,  # TRL's default
        report_to="none",
        save_strategy="no",
        logging_steps=cli.steps,
        disable_tqdm=True,
        max_length=None,
        seed=0,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear") if lora else None
    kwargs = {}
    if method is None:
        args = SFTConfig(**common, loss_type="nll")
        trainer_cls = SFTTrainer
    else:
        args = PrioritySFTConfig(**common, priority=method)
        trainer_cls = PrioritySFTTrainer
        if get_priority(method).reference == "explicit":
            kwargs["ref_model"] = copy.deepcopy(model)
    timer = StepTimer()
    # Memory from before the trainer is built, so that a frozen reference copy counts
    with PeakMemory() as memory:
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[timer],
            **kwargs,
        )
        trainer.train()
    return statistics.median(timer.times), memory.value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(available_priorities()))
    parser.add_argument("--modes", default="lora,full", help="lora, full or both")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    cli = parser.parse_args()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}")
    config = LlamaConfig(
        vocab_size=cli.vocab,
        hidden_size=cli.hidden,
        intermediate_size=cli.hidden * 3,
        num_hidden_layers=cli.layers,
        num_attention_heads=max(1, cli.hidden // 64),
        num_key_value_heads=max(1, cli.hidden // 128),
        max_position_embeddings=cli.seq_len * 2,
        pad_token_id=cli.vocab - 2,
        eos_token_id=cli.vocab - 1,
    )
    tokenizer = make_tokenizer(cli.vocab)
    prompt_len = cli.seq_len // 4
    dataset = make_dataset(cli.batch_size * cli.steps, prompt_len, cli.seq_len - prompt_len, cli.vocab)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    print(
        f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, vocab {cli.vocab}, "
        f"batch {cli.batch_size} x {cli.seq_len} tokens, {cli.steps} steps x {cli.repeats} repeats"
    )

    rows = []
    with tempfile.TemporaryDirectory() as output_dir:
        # One untimed run first: allocator, thread pools and caches warm up before anything is compared
        run_once(None, True, copy.deepcopy(base), dataset, tokenizer, cli, output_dir)
        for mode in cli.modes.split(","):
            for method in cli.methods.split(","):
                time_ratios, memory_ratios = [], []
                for _ in range(cli.repeats):
                    # Alternate: TRL, then the method, each from the same starting weights
                    t_ref, m_ref = run_once(
                        None, mode == "lora", copy.deepcopy(base), dataset, tokenizer, cli, output_dir
                    )
                    t, m = run_once(method, mode == "lora", copy.deepcopy(base), dataset, tokenizer, cli, output_dir)
                    time_ratios.append(t / t_ref)
                    memory_ratios.append(m / m_ref if m_ref > 0 else float("nan"))
                rows.append((mode, method, time_ratios, memory_ratios))
                print(
                    f"  {mode:5s} {method:11s} time x{statistics.median(time_ratios):.3f}  "
                    f"memory x{statistics.median(memory_ratios):.3f}",
                    flush=True,
                )

    print("\n| mode | method | time ratio (median, min-max) | peak memory ratio (median, min-max) |")
    print("|---|---|---|---|")
    for mode, method, time_ratios, memory_ratios in rows:
        print(
            f"| {mode} | {method} | {statistics.median(time_ratios):.3f} ({min(time_ratios):.3f}-{max(time_ratios):.3f})"
            f" | {statistics.median(memory_ratios):.3f} ({min(memory_ratios):.3f}-{max(memory_ratios):.3f}) |"
        )


if __name__ == "__main__":
    main()
