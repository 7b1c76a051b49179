"""Normalising a loaded model so that every later step is simpler.

Weights become initializers (whatever node held them), Identity nodes go, BatchNormalization and
constant scale / shift after a Conv are folded into it, node names are made unique. Works on a copy.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .external import externalise, return_freed_heap, tensor_array, uses_external_data
from .subgraph import consumers, node_reads


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a normalised copy: Constant weights as initializers, no Identity nodes, BatchNorm and
    constant scale / shift folded into Convs."""
    model = copy.deepcopy(model)
    _constants_to_initializers(model)
    _drop_initializer_inputs(model)
    _remove_identities(model)
    _fold_batchnorm(model)
    _fold_affine(model)
    _unique_node_names(model)
    if uses_external_data(model):
        externalise(model)
    if model.ByteSize() >= 2 ** 31:   # cannot be serialised in one piece: kept as it is
        return model
    # A fresh copy, in memory only its own size: protobuf keeps the memory of removed or replaced messages in
    # the model's arena until the whole model is freed, and folding BatchNorm replaces every weight, so the
    # folded model would hold about three times its weights for the whole run (light ResNet-50: +300 MB).
    compact = onnx.ModelProto.FromString(model.SerializeToString())
    del model
    return_freed_heap()
    return compact


def _unique_node_names(model: onnx.ModelProto) -> None:
    """Layers are addressed by node name (--ranks, the report): repeated names get a suffix."""
    seen: set[str] = set()
    for node in model.graph.node:
        if node.name and node.name in seen:
            node.name = _fresh_name(seen, node.name)
        if node.name:
            seen.add(node.name)


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            a = node.attribute[0]
            tensor = None
            if a.name == "value":
                tensor = copy.deepcopy(a.t)
            elif a.name == "value_float":
                tensor = numpy_helper.from_array(np.array(a.f, dtype=np.float32))
            elif a.name == "value_floats":
                tensor = numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
            elif a.name == "value_int":
                tensor = numpy_helper.from_array(np.array(a.i, dtype=np.int64))
            elif a.name == "value_ints":
                tensor = numpy_helper.from_array(np.array(list(a.ints), dtype=np.int64))
            if tensor is not None:
                tensor.name = node.output[0]
                g.initializer.append(tensor)
                continue
        keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def _remove_identities(model: onnx.ModelProto) -> None:
    """Drop Identity nodes, rewiring their readers to the Identity's input.

    Exporters write ``Conv -> Add(bias) -> Identity -> activation``: the Identity hides both the
    foldable bias and the activation. A graph output keeps its name: its producer is renamed
    instead. Tensors read inside If / Loop bodies are left alone (renaming there is not worth it).
    """
    g = model.graph
    outputs = {o.name for o in g.output}
    sub_reads = set().union(*(node_reads(n) - set(n.input) for n in g.node))
    alias: dict[str, str] = {}
    keep = []
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
        if (n.op_type == "Identity" and n.domain in ("", "ai.onnx") and len(n.input) == 1 and n.input[0]
                and n.output[0] not in outputs and n.output[0] not in sub_reads):
            alias[n.output[0]] = n.input[0]
            continue
        keep.append(n)
    # Identity -> graph output: the producer writes the output name directly.
    fixed = {i.name for i in g.input} | {t.name for t in g.initializer} | outputs | sub_reads
    producer = {o: n for n in keep for o in n.output}
    done = set()
    for n in keep:
        if n.op_type != "Identity" or n.domain not in ("", "ai.onnx") or len(n.input) != 1:
            continue
        x, y = n.input[0], n.output[0]
        if x in fixed or x not in producer or x in done:
            continue
        prod = producer[x]
        prod.output[list(prod.output).index(x)] = y
        for m in keep:
            for i, name in enumerate(m.input):
                if name == x:
                    m.input[i] = y
        done.add(x)
        alias[x] = y
        n.input[0] = ""  # marks it for removal below
    keep = [n for n in keep if not (n.op_type == "Identity" and n.input and n.input[0] == "")]
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
        vi = [v for v in g.value_info if v.name not in alias]
        del g.value_info[:]
        g.value_info.extend(vi)


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires initializers to be graph inputs; drop them so weights are true constants."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    feeds = [i for i in g.input if i.name not in inits]
    if len(feeds) != len(g.input):
        del g.input[:]
        g.input.extend(feeds)
    if model.ir_version < 4:
        model.ir_version = 4


def _fold_batchnorm(model: onnx.ModelProto) -> None:
    """Fold inference-mode BatchNormalization into the Conv that feeds only it."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    cons = consumers(g)
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    removed = []
    for bn in list(g.node):
        if bn.op_type != "BatchNormalization" or len(bn.input) < 5:
            continue
        if len([o for o in bn.output if o]) != 1:
            continue  # training-mode BN
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(cons.get(bn.input[0], [])) != 1 or bn.input[0] in outputs:
            continue
        if not all(name in inits for name in bn.input[1:5]) or conv.input[1] not in inits:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (tensor_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        w_t = inits[conv.input[1]]
        w = tensor_array(w_t).astype(np.float64)
        b = (tensor_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        scale = gamma / np.sqrt(var + eps)
        dtype = helper.tensor_dtype_to_np_dtype(w_t.data_type)
        new_w = numpy_helper.from_array((w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype),
                                        _fresh_name(inits, conv.input[1] + "_bnfolded"))
        new_b = numpy_helper.from_array(((b - mean) * scale + beta).astype(dtype),
                                        _fresh_name(inits, (conv.name or conv.output[0]) + "_bias_bnfolded"))
        for t in (new_w, new_b):
            g.initializer.append(t)
            inits[t.name] = t
        del conv.input[1:]
        conv.input.extend([new_w.name, new_b.name])
        conv.output[0] = bn.output[0]
        removed.append(bn)
    if removed:
        ids = {id(n) for n in removed}
        keep = [n for n in g.node if id(n) not in ids]
        del g.node[:]
        g.node.extend(keep)
        _drop_unused_initializers(model)


def _fold_affine(model: onnx.ModelProto) -> None:
    """Fold constant per-channel Mul / Add / Sub / Div that directly follow a Conv into it.

    Paddle exports write BatchNorm-like scale and shift this way (PP-OCR); once folded, the Conv
    is followed directly by its activation and the nonlinear solver can target it.
    """
    g = model.graph
    changed = True
    while changed:
        changed = False
        inits = {t.name: t for t in g.initializer}
        cons = consumers(g)
        outputs = {o.name for o in g.output}
        producer = {o: n for n in g.node for o in n.output}
        for op in list(g.node):
            if op.op_type not in ("Mul", "Add", "Sub", "Div") or len(op.input) != 2:
                continue
            for pos in (0, 1):
                conv = producer.get(op.input[pos])
                if conv is not None and conv.op_type == "Conv":
                    break
            else:
                continue
            const = op.input[1 - pos]
            y = conv.output[0]
            if (const not in inits or conv.input[1] not in inits or len(cons.get(y, [])) != 1 or y in outputs
                    or (op.op_type in ("Sub", "Div") and pos != 0)):
                continue
            has_bias = len(conv.input) > 2 and bool(conv.input[2])
            if has_bias and conv.input[2] not in inits:
                continue
            w_t = inits[conv.input[1]]
            if w_t.data_type != onnx.TensorProto.FLOAT:
                continue
            w = tensor_array(w_t).astype(np.float64)
            c = tensor_array(inits[const]).astype(np.float64)
            d = w.shape[0]
            if c.size == 1:
                c = np.full(d, float(c.reshape(-1)[0]))
            elif c.size == d and c.ndim >= 3 and c.shape[-(w.ndim - 1):] == (d,) + (1,) * (w.ndim - 2):
                c = c.reshape(d)
            else:
                continue
            b = tensor_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(d)
            if op.op_type == "Mul":
                w, b = w * c.reshape(-1, *([1] * (w.ndim - 1))), b * c
            elif op.op_type == "Div":
                if np.any(c == 0):
                    continue
                w, b = w / c.reshape(-1, *([1] * (w.ndim - 1))), b / c
            else:
                b = b + c if op.op_type == "Add" else b - c
            base = conv.name or y
            new_w = numpy_helper.from_array(w.astype(np.float32), _fresh_name(inits, f"{base}_W_folded"))
            inits[new_w.name] = new_w
            new_b = numpy_helper.from_array(b.astype(np.float32), _fresh_name(inits, f"{base}_B_folded"))
            inits[new_b.name] = new_b
            g.initializer.extend([new_w, new_b])
            del conv.input[1:]
            conv.input.extend([new_w.name, new_b.name])
            conv.output[0] = op.output[0]
            g.node.remove(op)
            changed = True
            break
    _drop_unused_initializers(model)


def _fresh_name(taken, base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    used = set().union(*(node_reads(n) for n in g.node)) | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
