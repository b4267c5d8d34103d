"""kompakt.compile / CompiledModel as a user meets them: calling, errors, save/load, report."""

import json
import os
import runpy
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from tiny_models import reference_output

import kompakt
from kompakt import InputError, KompaktError, PassError, PipelineError, TargetError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def llama_w4(captured):
    return kompakt.compile(captured("llama"), target="cpu-w4")


def test_compile_a_module_directly(tiny):
    model = tiny("qwen2")
    ids = tokens(EXAMPLE_SHAPE)
    compiled = kompakt.compile(model, example_inputs=(ids,), target="cpu")
    assert compiled.backend == "onnxruntime"
    torch.testing.assert_close(compiled(ids), reference_output(model, ids), rtol=1e-4, atol=1e-4)


def test_call_positionally_by_name_and_with_numpy(llama_w4):
    ids = tokens(OTHER_SHAPE, seed=5)
    a = llama_w4(ids)
    b = llama_w4(input_ids=ids)
    c = llama_w4(ids.numpy())
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert a.shape == (*OTHER_SHAPE, 96)


def test_int32_tokens_are_accepted(llama_w4):
    ids = tokens(OTHER_SHAPE)
    torch.testing.assert_close(llama_w4(ids.to(torch.int32)), llama_w4(ids))


def test_several_outputs_come_back_as_a_tuple(captured):
    compiled = kompakt.compile(captured("bert"), target="cpu")
    out = compiled(tokens(EXAMPLE_SHAPE))
    assert isinstance(out, tuple) and len(out) == 2
    assert compiled.output_names == ["last_hidden_state", "pooler_output"]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda m: m(), "missing input.*input_ids: int64\\[batch, sequence\\]"),
        (lambda m: m(input_idz=tokens((1, 2))), "did you mean 'input_ids'"),
        (lambda m: m(tokens((1, 2)), tokens((1, 2))), "takes 1"),
        (lambda m: m(torch.randn(1, 4)), "must be int64, got float32"),
        (lambda m: m(tokens((4,))), "must have rank 2"),
        (lambda m: m([[1, 2]]), "must be a torch.Tensor"),
        (lambda m: m(tokens((1, 2)), input_ids=tokens((1, 2))), "both positionally and by name"),
    ],
)
def test_bad_inputs_are_named(llama_w4, call, fragment):
    with pytest.raises(InputError, match=fragment):
        call(llama_w4)


def test_save_and_load_round_trip(llama_w4, tmp_path):
    folder = llama_w4.save(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == [
        "kompakt.json",
        "model.onnx",
        "model.safetensors",
    ]
    meta = json.loads((folder / "kompakt.json").read_text())
    assert meta["pipeline"] == llama_w4.pipeline and meta["target"] == "cpu-w4"
    loaded = kompakt.load(folder)
    ids = tokens(OTHER_SHAPE, seed=9)
    torch.testing.assert_close(loaded(ids), llama_w4(ids))
    assert loaded.report().size_after.bytes == llama_w4.report().size_after.bytes
    reference = kompakt.load(folder, backend="reference")
    torch.testing.assert_close(reference(ids), llama_w4(ids), rtol=0.05, atol=0.05)


def test_saved_model_onnx_runs_in_onnxruntime_as_is(llama_w4, tmp_path):
    import onnxruntime as ort

    folder = llama_w4.save(tmp_path / "saved")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = tokens(OTHER_SHAPE)
    torch.testing.assert_close(
        torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0]), llama_w4(ids)
    )


def test_load_refuses_what_is_not_a_saved_model(tmp_path):
    with pytest.raises(KompaktError, match="not a saved kompakt model"):
        kompakt.load(tmp_path)
    (tmp_path / "kompakt.json").write_text("{not json")
    with pytest.raises(KompaktError, match="unreadable"):
        kompakt.load(tmp_path)


def test_report_has_passes_sizes_and_predicted_time(llama_w4):
    report = llama_w4.report()
    assert [p.name for p in report.passes] == ["canonicalize", "quantize-weights"]
    assert report.size_after.bytes < report.size_before.bytes
    assert report.size_after.parameters == report.size_before.parameters
    assert report.latency_after is not None and report.latency_after.seconds > 0
    assert report.latency_after.seconds < report.latency_before.seconds
    matmuls = [c for c in report.latency_after.nodes if c.op == "MatMul"]
    assert matmuls and all(c.seconds > 0 for c in matmuls)
    text = str(report)
    for fragment in (
        "quantize-weights",
        "size:",
        "predicted time",
        "model.layers.0.mlp.down_proj",
        "x smaller",
    ):
        assert fragment in text
    assert "lm_head" in llama_w4.render_report(verbose=True)


def test_pipeline_is_kept_on_the_model(llama_w4):
    assert (
        llama_w4.pipeline == "canonicalize,quantize-weights{bits=4,group-size=128,symmetric=false}"
    )
    assert llama_w4.ir.metadata_props["kompakt.pipeline"] == llama_w4.pipeline


def test_explicit_pipeline_overrides_the_target(captured):
    compiled = kompakt.compile(
        captured("opt"), target="cpu", pipeline="canonicalize,quantize-weights{bits=8}"
    )
    assert compiled.pipeline == "canonicalize,quantize-weights{bits=8}"
    assert compiled.report().passes[-1].result.stats["quantized"] > 0


def test_dump_ir_writes_one_file_per_pass(captured, tmp_path):
    kompakt.compile(captured("bert"), target="cpu-w8", dump_ir=tmp_path / "dump")
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert names == ["00-input.txt", "01-canonicalize.txt", "02-quantize-weights.txt"]
    assert "DequantizeLinear" in (tmp_path / "dump" / "02-quantize-weights.txt").read_text()


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"target": "cpu-w7"}, TargetError, "unknown token 'w7'"),
        (
            {"pipeline": "canonicalize,quantise-weights"},
            PipelineError,
            "did you mean 'quantize-weights'",
        ),
        ({"backend": "tensorrt"}, KompaktError, "unknown backend 'tensorrt'"),
        ({"dump_irr": "x"}, KompaktError, "did you mean 'dump_ir'"),
        ({"pipeline": "quantize-weights"}, PipelineError, "add 'canonicalize' before it"),
    ],
)
def test_bad_arguments_fail_before_capture(tiny, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        kompakt.compile(tiny("llama"), example_inputs=(tokens(EXAMPLE_SHAPE),), **kwargs)


def test_unsupported_model_type():
    with pytest.raises(KompaktError, match="must be a torch.nn.Module"):
        kompakt.compile(42)


def test_export_to_an_unwritable_path(llama_w4, tmp_path):
    with pytest.raises(KompaktError, match="does not exist"):
        llama_w4.export_onnx(tmp_path / "missing" / "m.onnx")
    with pytest.raises(KompaktError, match="is a directory"):
        llama_w4.export_onnx(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(KompaktError, match="permission denied"):
            llama_w4.export_onnx(locked / "m.onnx")
    finally:
        locked.chmod(0o700)


def test_a_failing_pass_is_named_with_the_passes_before_it(captured):
    from dataclasses import dataclass
    from typing import ClassVar

    @kompakt.register_pass
    @dataclass(frozen=True)
    class Explode(kompakt.Pass):
        """Always fails. Before: g After: (error)"""

        name: ClassVar[str] = "explode-for-test"

        def run(self, model, ctx):
            raise ValueError("boom")

    with pytest.raises(
        PassError, match=r"pass 'explode-for-test' failed \(after: canonicalize\): ValueError: boom"
    ):
        kompakt.compile(captured("bert"), target="cpu", pipeline="canonicalize,explode-for-test")


def test_custom_pass_example_runs_by_name(capsys):
    namespace = runpy.run_path(str(EXAMPLES / "custom_pass.py"), run_name="custom_pass_example")
    compiled = namespace["main"]()
    record = compiled.report().passes[-1]
    assert record.name == "zero-small-weights"
    assert 0 < record.result.stats["zeroed"] < record.result.stats["of"]
    assert "zero-small-weights" in capsys.readouterr().out


def test_calibration_that_nothing_uses_is_reported(captured):
    with pytest.warns(UserWarning, match="no pass in 'canonicalize' uses it"):
        kompakt.compile(captured("bert"), target="cpu", calibration=[(tokens(EXAMPLE_SHAPE),)])


def test_status_lines_on_a_terminal_and_not_when_asked(captured, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    kompakt.compile(captured("bert"), target="cpu-w8")
    err = capsys.readouterr().err
    assert (
        "kompakt: capturing onnx_ir.Model 'BertModel'" in err
        and "kompakt: running canonicalize,quantize-weights" in err
    )
    kompakt.compile(captured("bert"), target="cpu-w8", progress=False)
    assert "kompakt:" not in capsys.readouterr().err
