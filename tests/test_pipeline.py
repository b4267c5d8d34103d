"""Pipeline strings, the registry, requires/provides checks and third-party passes."""

import sys
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest

from kompakt import Pass, PassResult, Pipeline, PipelineError
from kompakt.passes.manager import PassManager
from kompakt.passes.registry import all_passes, reload_plugins


@pytest.mark.parametrize(
    "text",
    [
        "canonicalize",
        "canonicalize,infer-shapes,quantize-weights",
        "canonicalize,quantize-weights{bits=4,group-size=128}",
        "canonicalize,quantize-weights{group-size=64,bits=8,symmetric=true}",
        "canonicalize,quantize-weights{exclude=[lm_head,*.down_proj],keep-lm-head=false}",
        'canonicalize,quantize-weights{exclude=["model.layers.0 attn"]}',
        "canonicalize,quantize-weights{exclude=[]}",
        "fold-constants{output-size-limit=1024},remove-dead-code",
    ],
)
def test_pipeline_strings_print_back_exactly(text):
    pipeline = Pipeline.parse(text)
    assert str(pipeline) == text
    assert Pipeline.parse(str(pipeline)) == pipeline


def test_spacing_is_normalized():
    assert str(Pipeline.parse(" canonicalize , quantize-weights { bits = 8 } ")) == (
        "canonicalize,quantize-weights{bits=8}"
    )


def test_options_are_typed():
    (_, quant) = Pipeline.parse(
        "canonicalize,quantize-weights{bits=3,exclude=[a,b],symmetric=true}"
    ).passes
    assert quant.bits == 3 and quant.exclude == ("a", "b") and quant.symmetric is True


def test_pipeline_from_pass_objects_prints_non_defaults():
    from kompakt.passes.quantize.quantize_weights import QuantizeWeights

    assert (
        str(Pipeline([QuantizeWeights(bits=8, group_size=-1)]))
        == "quantize-weights{bits=8,group-size=-1}"
    )
    assert str(Pipeline([QuantizeWeights()])) == "quantize-weights"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("canonicalise", "did you mean 'canonicalize'"),
        ("quantize-weights{bit=4}", r"has no option 'bit' \(did you mean 'bits'\?\)"),
        ("quantize-weights{bits=four}", "expects int, got 'four'"),
        ("quantize-weights{bits=5}", "bits must be one of"),
        ("quantize-weights{group-size=100}", "power of two"),
        ("quantize-weights{symmetric=yes}", "expects bool"),
        ("quantize-weights{bits=4", "expected '}'|expected ','"),
        ("canonicalize,,", "expected a pass name"),
        ("quantize-weights{bits=4,bits=8}", "given twice"),
    ],
)
def test_bad_pipelines_point_at_the_fault(text, fragment):
    with pytest.raises(PipelineError, match=fragment):
        Pipeline.parse(text)


def test_error_shows_position():
    with pytest.raises(PipelineError) as err:
        Pipeline.parse("canonicalize,quantize-weights{bitz=4}")
    assert "position 30" in str(err.value) and "^" in str(err.value)


def test_requires_are_checked_before_anything_runs():
    with pytest.raises(PipelineError, match="requires 'canonical'.*add 'canonicalize' before it"):
        PassManager("quantize-weights")
    PassManager("canonicalize,quantize-weights")  # fine


def test_every_builtin_pass_has_before_after_docstring():
    for name, cls in all_passes().items():
        if cls.__module__.startswith("kompakt."):
            doc = cls.__doc__ or ""
            assert "Before:" in doc and "After:" in doc, (
                f"pass '{name}' lacks a Before/After docstring"
            )


def test_entry_point_plugin_registers_by_name(tmp_path, monkeypatch):
    """A package installed with a `kompakt.passes` entry point works in pipeline strings."""
    package = tmp_path / "kompakt_plugin_demo.py"
    package.write_text(
        textwrap.dedent(
            '''
            from dataclasses import dataclass
            from typing import ClassVar
            from kompakt import Pass, PassResult

            @dataclass(frozen=True)
            class CountNodes(Pass):
                """Count nodes. Before: g  After: g (unchanged)"""
                name: ClassVar[str] = "count-nodes-plugin"
                def run(self, model, ctx):
                    return PassResult(stats={"nodes": model.graph.num_nodes()})
            '''
        )
    )
    dist = tmp_path / "kompakt_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kompakt-plugin-demo\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        "[kompakt.passes]\ncount-nodes-plugin = kompakt_plugin_demo:CountNodes\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reload_plugins()
    try:
        assert "count-nodes-plugin" in all_passes()
        assert (
            str(Pipeline.parse("canonicalize,count-nodes-plugin"))
            == "canonicalize,count-nodes-plugin"
        )
    finally:
        sys.modules.pop("kompakt_plugin_demo", None)


def test_duplicate_names_are_refused():
    from kompakt import register_pass

    @dataclass(frozen=True)
    class Impostor(Pass):
        """Before: x After: x"""

        name: ClassVar[str] = "canonicalize"

        def run(self, model, ctx):
            return PassResult()

    with pytest.raises(PipelineError, match="is taken by"):
        register_pass(Impostor)
