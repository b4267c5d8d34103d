"""The kompakt command line."""

import io
import subprocess
import sys

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kompakt.cli import main


@pytest.fixture()
def linear_onnx(tmp_path):
    torch.manual_seed(0)
    w = numpy_helper.from_array((torch.randn(256, 64) * 0.05).numpy(), "fc.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="/fc/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [w],
    )
    path = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def test_compile_writes_a_quantized_onnx(linear_onnx, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["compile", str(linear_onnx), "--target", "cpu-w4", "-o", str(out)]) == 0
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops == ["DequantizeLinear", "MatMul"]
    text = capsys.readouterr().out
    assert "quantize-weights" in text and f"wrote {out}" in text


def test_compile_with_pipeline_and_dump(linear_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    code = main(
        [
            "compile",
            str(linear_onnx),
            "-o",
            str(out),
            "--pipeline",
            "canonicalize,quantize-weights{bits=8,group-size=-1}",
            "--dump-ir",
            str(tmp_path / "ir"),
        ]
    )
    assert code == 0 and (tmp_path / "ir" / "02-quantize-weights.txt").exists()


def test_compile_refuses_unwritable_output_before_working(linear_onnx, tmp_path, capsys):
    assert main(["compile", str(linear_onnx), "-o", str(tmp_path / "no" / "out.onnx")]) == 2
    assert "kompakt: error: cannot write" in capsys.readouterr().err


def test_compile_reports_bad_input_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12")
    assert main(["compile", str(bad), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "bad.onnx" in err and "Traceback" not in err


def test_bad_target_on_the_command_line(linear_onnx, tmp_path, capsys):
    assert main(["compile", str(linear_onnx), "-t", "cpu-w5", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "unknown token 'w5'" in capsys.readouterr().err


def test_inspect(linear_onnx, capsys):
    assert main(["inspect", str(linear_onnx)]) == 0
    out = capsys.readouterr().out
    assert "parameters: 16,384" in out and "MatMul" in out and "x: f32[batch,256]" in out


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert (
        "quantize-weights:" in out
        and "group-size (int, default 128)" in out
        and "canonicalize:" in out
    )
    assert "exclude (list of str, default [])" in out and "symmetric (bool, default false)" in out


def test_targets_lists_devices_and_tokens(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for fragment in ("a100", "h100", "h200", "l4", "rtx4090", "cpu", "g32 / g64 / g128", "W4A16"):
        assert fragment in out


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "kompakt.cli", "targets"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "devices:" in result.stdout


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """`kompakt ... | head` closes stdout early; kompakt exits 0 without a traceback."""

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["passes"]) == 0
    assert "Traceback" not in capsys.readouterr().err
