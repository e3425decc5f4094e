#!/usr/bin/env bash
# Prove and measure the CUDA path on a GPU machine in one command (under 6 minutes on one H100):
# the environment, the CUDA tests, the GPU benchmark against the reference, and the course run (471 steps of
# 64x128 in bf16 with its evals and checkpoints, then interrupted and resumed). Writes report.json and the logs
# to $OUT (else ./gpu-check). Runs from a checkout with no downloads: PYTHONPATH points at it.
#
#   bash scripts/gpu_check.sh --prepare MODEL_DIR DATASET_DIR   # once, where the files are: copies the model's
#                                                              # config + tokenizer and the dataset's train split
#                                                              # into .gpu-assets/ (git-ignored)
#   bash scripts/gpu_check.sh                                   # on the GPU machine
#   bash scripts/gpu_check.sh --cpu                             # every stage on the CPU, tiny model (< 3 min)
#
# Other flags go to bench/gpu_check.py (--stages, --timeouts, --out; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}

if [[ "${1:-}" == "--prepare" ]]; then
    model=${2:?usage: gpu_check.sh --prepare MODEL_DIR DATASET_DIR}
    dataset=${3:?usage: gpu_check.sh --prepare MODEL_DIR DATASET_DIR}
    mkdir -p .gpu-assets/model .gpu-assets/imdb/plain_text
    for name in config.json tokenizer.json tokenizer_config.json vocab.txt; do
        if [[ -f "$model/$name" ]]; then cp "$model/$name" .gpu-assets/model/; fi
    done
    cp "$dataset"/plain_text/train-*.parquet .gpu-assets/imdb/plain_text/
    du -sh .gpu-assets
    exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu_check.py "$@"
