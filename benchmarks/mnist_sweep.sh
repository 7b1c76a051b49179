#!/usr/bin/env bash
# Sweep of the demo model: accuracy against theoretical and measured (onnxruntime, 1 thread) speed-up.
set -euo pipefail
cd "$(dirname "$0")/.."
onnx-lowrank sweep models/mnist_vgg/mnist_vgg.onnx --calib models/mnist_vgg/calib.npz --objective flops --rank-multiple 1 \
    --eval-data models/mnist_vgg/heldout.npz --labels label --speedups 1.5,2,3,4,6,10 \
    --runs 200 --threads 1 --out benchmarks/results/mnist_sweep -q
