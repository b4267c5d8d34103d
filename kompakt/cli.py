"""The `kompakt` command: compile, inspect, passes, targets, demo."""

from __future__ import annotations

import argparse
import collections
import os
import sys
import typing
from pathlib import Path

from kompakt.errors import KompaktError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KompaktError as err:
        print(f"kompakt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kompakt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` or similar, which stopped reading
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (keeps Python from failing at exit)
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kompakt", description="A compression compiler for neural networks."
    )
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("compile", help="compile an ONNX model for a target and write ONNX")
    p.add_argument("input", help="input .onnx file")
    p.add_argument(
        "-t", "--target", default="cpu", help="target, e.g. cpu-w4 (see `kompakt targets`)"
    )
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument(
        "--pipeline", help="pipeline string overriding the target's (see `kompakt passes`)"
    )
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass into DIR")
    p.add_argument("--verbose", action="store_true", help="print every row of the report")
    p.add_argument(
        "--matmulnbits",
        action="store_true",
        help="write quantized MatMuls as ONNX Runtime's MatMulNBits (default: standard DequantizeLinear)",
    )
    p.set_defaults(run=_compile)

    p = sub.add_parser(
        "inspect", help="ops, parameters and bytes by dtype of an ONNX file or saved model"
    )
    p.add_argument("path", help=".onnx file or folder written by CompiledModel.save")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.set_defaults(run=_passes)

    p = sub.add_parser("targets", help="list devices and recipe tokens")
    p.set_defaults(run=_targets)

    p = sub.add_parser(
        "demo", help="compress all-MiniLM-L6-v2 (bundled) and compare size, fidelity, speed"
    )
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median)")
    p.set_defaults(run=_demo)
    return parser


def _compile(args) -> int:
    from kompakt.api import compile
    from kompakt.lowering.to_onnx import check_writable

    check_writable(args.output)  # fail before the (possibly long) compile
    compiled = compile(args.input, target=args.target, pipeline=args.pipeline, dump_ir=args.dump_ir)
    path = compiled.export_onnx(args.output, matmulnbits=args.matmulnbits)
    print(compiled.render_report(verbose=args.verbose))
    print(f"\nwrote {path}")
    return 0


def _inspect(args) -> int:
    from kompakt.lowering import load_onnx
    from kompakt.report import SizeStats

    path = Path(args.path)
    model = load_onnx(path / "model.onnx" if path.is_dir() else path)
    graph = model.graph
    size = SizeStats.of(model)
    ops = collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain else n.op_type) for n in graph
    )
    print(
        f"{path}: graph '{graph.name}', opset {model.opset_imports.get('', '?')}, {graph.num_nodes()} nodes"
    )
    for label, values in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        from kompakt.ir.printer import format_type

        print(f"{label}:")
        for v in values:
            print(f"  {v.name}: {format_type(v)}")
    print(f"parameters: {size.parameters:,}   weight bytes: {size.bytes:,}")
    for dtype, n in size.bytes_by_dtype.items():
        print(f"  {dtype:<10} {n:>14,} bytes")
    print("ops:")
    for op, n in ops.most_common():
        print(f"  {op:<28} {n:>6}")
    return 0


def _passes(args) -> int:
    from kompakt.passes.pipeline import format_value
    from kompakt.passes.registry import all_passes

    for name, cls in all_passes().items():
        print(f"{name}: {cls.summary()}")
        if cls.requires or cls.provides:
            print(
                f"    requires: {', '.join(sorted(cls.requires)) or '-'}   provides: {', '.join(sorted(cls.provides)) or '-'}"
            )
        for option in cls.options():
            default = format_value(option.default)
            print(f"    {option.name} ({_type_name(option.type)}, default {default}): {option.doc}")
    return 0


def _type_name(annotation) -> str:
    """How an option's type reads to a user: int, list of str, one of a|b, ... or none."""
    from kompakt.passes.base import is_optional, strip_optional

    suffix = " or none" if is_optional(annotation) else ""
    base = strip_optional(annotation)
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return "one of " + "|".join(map(str, typing.get_args(base))) + suffix
    if origin in (tuple, list):
        (item, *_) = typing.get_args(base) or (str,)
        return f"list of {getattr(item, '__name__', item)}" + suffix
    return getattr(base, "__name__", str(base)) + suffix


def _targets(args) -> int:
    from kompakt.targets.hardware import PRESETS
    from kompakt.targets.recipe import TOKEN_HELP

    print("devices:")
    for name, spec in PRESETS.items():
        peak = ", ".join(f"{k} {v / 1e12:g}T" for k, v in spec.peak_flops.items())
        print(f"  {name:<8} {spec.description}: {spec.memory_bandwidth / 1e9:g} GB/s; {peak}")
    print("\nrecipe tokens (target = <device>[-<token>...], e.g. cpu-w4, a100-w4-g64-sym):")
    for token, text in TOKEN_HELP.items():
        print(f"  {token:<56} {text}")
    return 0


def _demo(args) -> int:
    from kompakt.demo import run_demo

    run_demo(repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
