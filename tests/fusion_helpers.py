"""Helpers the fusion and backend tests share."""

from __future__ import annotations

import kompakt


def compile_for_gpu(model, pipeline, backend="reference", **options):
    """Compiles for target a100 with an explicit pipeline, quietly, without the latency run."""
    options.setdefault("estimate_latency", False)  # a model run per compile: not needed here
    return kompakt.compile(
        model, target="a100", pipeline=pipeline, backend=backend, progress=False, **options
    )


def first_output(out):
    """A compiled model's first output (it returns a tuple when the graph has several)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def assert_same_as_unfused(cm, plain, shapes, inlines_back=True):
    """The fused compile gives exactly the unfused one's output at every shape (token ids of
    ``shapes``), and, inlined again, is the unfused graph op for op."""
    import collections

    import torch
    from conftest import tokens

    from kompakt.ir.fused import inline_fused

    for shape in shapes:
        ids = tokens(shape)
        assert torch.equal(first_output(cm(ids)), first_output(plain(ids)))
    if inlines_back:
        ops = collections.Counter(n.op_type for n in inline_fused(cm.ir).graph)
        assert ops == collections.Counter(n.op_type for n in plain.ir.graph)


def assert_exports_standard_onnx(cm, folder, ids, rtol=1e-4, atol=1e-5):
    """The compiled model exports with no kompakt ops left, and onnxruntime runs the file to
    the compiled model's output."""
    import onnx
    import onnxruntime as ort
    import torch

    path = cm.export_onnx(folder / "m.onnx")
    proto = onnx.load(path)
    assert not any(n.domain == "kompakt" for n in proto.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), first_output(cm(ids)), rtol=rtol, atol=atol)
    return proto
