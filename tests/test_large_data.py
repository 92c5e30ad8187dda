"""The large-data check at a size CI affords (`scripts/check_large_data.py` prints the timings at 10k-100k).

Word and span granularity at the largest example indices of 4,000 generated examples, under a memory cap: the old
grouping (`example_index * 65536 + unit`, pooled into a `B × (max id + 1)` table) needed ~2 GB for Φ of the last two
rows here (13 GB per row at example 50,000) and fails under the cap; the per-batch numbering needs a few bytes per
token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib.util, json, resource, sys
sys.path.insert(0, {repository!r})
spec = importlib.util.spec_from_file_location("check", {script!r})
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
from tests.conftest import build_args, build_model, build_tokenizer
from trl_priority import PrioritySFTTrainer

tokenizer = build_tokenizer()
dataset = check.generated_dataset({n})
trainers = {{}}
for granularity in ("word", "span"):
    args = build_args({output!r} + "/" + granularity, priority="dft", priority_granularity=granularity, use_cpu=True)
    trainers[granularity] = PrioritySFTTrainer(
        model=build_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
    )
# From here on at most 1 GiB more address space: the last rows' Φ must not need a table sized by the example index
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
result = {{}}
for granularity, trainer in trainers.items():
    rows = len(trainer.train_dataset)
    last = trainer.train_dataset.select([rows - 2, rows - 1])
    assert max(max(row) for row in last["example_index"]) == rows - 1
    phi = trainer.token_priorities(last)  # (2, T-1)
    result[granularity] = [rows, int((phi > 0).sum())]
print(json.dumps(result))
"""


def test_word_and_span_priorities_at_large_example_indices_need_little_memory(tmp_path):
    n = 4_000
    code = CHILD.format(
        repository=str(REPOSITORY),
        script=str(REPOSITORY / "scripts" / "check_large_data.py"),
        n=n,
        output=str(tmp_path),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for granularity in ("word", "span"):
        rows, weighted = result[granularity]
        assert rows == n and weighted > 0
