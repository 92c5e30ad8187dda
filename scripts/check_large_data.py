"""Large-data check: time and peak memory of data preparation and `precompute-ref` as the dataset grows.

    OMP_NUM_THREADS=1 python scripts/check_large_data.py --sizes 10000 30000 100000

A generated dataset of short prompt-completion examples (no download: "What is a + b?" / "a + b = c, so the answer is
c." with distinct numbers, and one character span per completion) goes through `PrioritySFTTrainer`'s data
preparation for a per-token method (`dft`), word granularity (`dft`, `priority_granularity: word`), span granularity
(`dft`, `priority_granularity: span`, a `spans` column) and `precompute-ref` (`prift_prob` with `ref_cache_dir`, a
tiny Llama as policy and reference: the reference's statistics of every row computed and written to the cache).
After preparation, Φ of the dataset's last two rows is computed (the largest example indices: where word and span
groups were numbered `example_index * 65536 + unit`).

Each (case, size) runs in a fresh process, which prints its wall time and peak resident memory (`ru_maxrss`: the
process's, imports included); the table gives both, and the time per 1,000 examples, which stays flat when the cost
grows linearly. The numbers depend on the machine and its load: compare sizes within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "token": dict(priority="dft"),
    "word": dict(priority="dft", priority_granularity="word"),
    "span": dict(priority="dft", priority_granularity="span"),
    "precompute_ref": dict(priority="prift_prob", ref_cache_batch_size=256),
}


def generated_dataset(n: int):
    """`n` short prompt-completion examples, each distinct, with one `spans` span (the answer) per completion."""
    from datasets import Dataset

    prompts, completions, spans = [], [], []
    for i in range(n):
        a, b = i % 997, (i * 7) % 1009
        completion = f"{a} + {b} = {a + b}, so the answer is {a + b}."
        start = completion.rindex(str(a + b))
        prompts.append(f"What is {a} + {b}? ")
        completions.append(completion)
        spans.append([[start, start + len(str(a + b))]])
    return Dataset.from_dict({"prompt": prompts, "completion": completions, "spans": spans})


def run_one(case: str, n: int, workdir: str) -> dict:
    """Prepare `n` examples for `case` in this process; return the seconds it took and Φ's shape on the last rows."""
    sys.path.insert(0, REPOSITORY)
    from tests.conftest import build_args, build_model, build_tokenizer, save_model_dir
    from trl_priority import PrioritySFTTrainer

    tokenizer = build_tokenizer()
    dataset = generated_dataset(n)
    settings = dict(CASES[case])
    ref_model = None
    if case == "precompute_ref":
        ref_model = save_model_dir(os.path.join(workdir, "reference"), tokenizer, 1)
        settings["ref_cache_dir"] = os.path.join(workdir, "cache")
    args = build_args(os.path.join(workdir, "out"), max_length=64, use_cpu=True, **settings)
    start = time.perf_counter()
    trainer = PrioritySFTTrainer(
        model=build_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer, ref_model=ref_model
    )
    prepared = time.perf_counter() - start
    rows = len(trainer.train_dataset)
    phi = trainer.token_priorities(trainer.train_dataset.select([rows - 2, rows - 1]))  # (2, T-1)
    return {"case": case, "n": n, "rows": rows, "seconds": prepared, "phi_shape": list(phi.shape)}


def measure(case: str, n: int) -> dict:
    """`run_one` in a fresh process: its result, with the process's peak resident memory."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, __file__, "--one", case, str(n), workdir]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{case} at {n} examples failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--one", nargs=3, metavar=("CASE", "N", "WORKDIR"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.one:
        case, n, workdir = options.one
        result = run_one(case, int(n), workdir)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
        print(json.dumps(result))
        return
    print("| case | examples | prepared rows | seconds | seconds per 1k examples | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for case in options.cases:
        for n in options.sizes:
            r = measure(case, n)
            per_k = r["seconds"] / n * 1000
            print(
                f"| {case} | {n:,} | {r['rows']:,} | {r['seconds']:.1f} | {per_k:.2f} | {r['peak_rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
