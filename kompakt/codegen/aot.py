"""Ahead-of-time compilation of Triton kernels for a GPU that is not here.

`compile_variants` builds each kernel variant with ``triton.compile`` for a ``GPUTarget``
(sm_80 = A100, sm_90 = H100/H200) and reports what a reviewer wants to see without a GPU: that it
builds, which tensor-core instructions the PTX uses (``mma.sync`` on sm_80, ``wgmma`` on sm_90),
and the registers, spills and shared memory ptxas assigns.

Under ``TRITON_INTERPRET=1`` (how the CPU test suite runs kernels) Triton's language module is
patched for the interpreter and cannot compile, so compilation then happens in a subprocess with
the interpreter switched off. Kernels are named by ``"package.module:function"`` so that
subprocess can import them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from kompakt.errors import CodegenError

ARCHS = {"sm_80": 80, "sm_90": 90}


@dataclass(frozen=True)
class Variant:
    """One kernel instance to build: the function, its argument types and its constants.

    Args:
        kernel: ``"module:function"`` of a ``@triton.jit`` function.
        signature: Triton type per runtime argument, e.g. ``{"x_ptr": "*fp16", "M": "i32"}``.
        constants: Values of the ``tl.constexpr`` arguments.
        arch: ``"sm_80"`` or ``"sm_90"``.
        num_warps: Warps per program.
        num_stages: Software-pipelining depth.
        aligned: Promise 16-byte-aligned pointers, as Triton's launcher does for every tensor
            whose address allows it (torch allocations do); without the promise the compiler
            must assume byte alignment, emits scalar loads and cannot pipeline them, and the
            registers and spills reported would not be those of a real launch.
        int_args: Values of the integer arguments at the launch the variant stands for. As
            Triton's launcher does, a value of 1 is compiled in as a constant and a multiple of
            16 is promised divisible by 16 (what lets a row that starts at ``row * stride`` load
            as 16-byte vectors, and masks by ``N`` cover whole vectors); an integer argument
            left out gets no promise, which is how the kernel builds for an odd size.
    """

    kernel: str
    signature: dict[str, str]
    constants: dict[str, int | float | bool | str | None] = field(default_factory=dict)
    arch: str = "sm_80"
    num_warps: int = 4
    num_stages: int = 3
    aligned: bool = True
    int_args: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    """What compiling one `Variant` gave."""

    variant: Variant
    ptx: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int

    @property
    def uses_mma(self) -> bool:
        """Ampere-style tensor-core MMA (``mma.sync``)."""
        return "mma.sync" in self.ptx

    @property
    def uses_wgmma(self) -> bool:
        """Hopper warp-group MMA (``wgmma.mma_async``)."""
        return "wgmma.mma_async" in self.ptx

    @property
    def widest_load_bits(self) -> int:
        """Bits read from global memory by the kernel's widest single load instruction (a
        ``ld.global`` vector, or a ``cp.async`` copy into shared memory); 128 is a full 16-byte
        vector, what a bandwidth-bound kernel needs to approach the copy rate."""
        widest = 0
        for vec, bits in _LOAD.findall(self.ptx):
            widest = max(widest, int(vec or 1) * int(bits))
        for size in _CP_ASYNC.findall(self.ptx):
            widest = max(widest, 8 * int(size, 0))
        return widest

    def summary(self) -> str:
        name = self.variant.kernel.rsplit(":", 1)[-1]
        tc = "wgmma" if self.uses_wgmma else "mma" if self.uses_mma else "no tensor cores"
        return (
            f"{name} {self.variant.arch}: {self.registers} registers, "
            f"{self.spill_stores}/{self.spill_loads} bytes spilled (store/load), "
            f"{self.shared_bytes} B shared, {tc}, loads up to {self.widest_load_bits} bits"
        )


_LOAD = re.compile(r"\bld\.global[\w:.]*?(?:\.v(\d))?\.[bfsu](\d+)\s")
_CP_ASYNC = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global[\w:.]*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)"
)


def compile_variants(variants: list[Variant]) -> list[Built]:
    """Builds every variant; in the interpreter, in one subprocess without it."""
    if not variants:
        return []
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_subprocess(variants)
    return [_compile_one(v) for v in variants]


def _compile_in_subprocess(variants: list[Variant]) -> list[Built]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([asdict(v) for v in variants])
    done = subprocess.run(
        [sys.executable, "-m", "kompakt.codegen.aot"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise CodegenError(f"ahead-of-time compile failed:\n{done.stderr[-4000:]}")
    rows = json.loads(done.stdout)
    return [
        Built(variant=v, **{k: r[k] for k in r if k != "variant"})
        for v, r in zip(variants, rows, strict=True)
    ]


def _compile_one(variant: Variant) -> Built:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if variant.arch not in ARCHS:
        raise CodegenError(f"unknown arch '{variant.arch}'; known: {', '.join(ARCHS)}")
    module_name, _, function_name = variant.kernel.partition(":")
    fn = getattr(importlib.import_module(module_name), function_name)
    if not isinstance(fn, JITFunction):
        raise CodegenError(f"{variant.kernel} is not a @triton.jit function")
    signature, constants, divisible = _specialize(variant)
    for name in constants:
        signature[name] = "constexpr"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn, signature, constants, attrs)
    capability = ARCHS[variant.arch]
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
    except Exception as err:  # Triton raises many types; say which variant failed
        raise CodegenError(f"{variant.kernel} did not compile for {variant.arch}: {err}") from err
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, capability)
    return Built(variant=variant, ptx=ptx, shared_bytes=int(compiled.metadata.shared), **usage)


def _specialize(variant: Variant) -> tuple[dict[str, str], dict, list[str]]:
    """Signature, constants and the arguments promised divisible by 16, as Triton's launcher
    would specialize a launch with ``variant.int_args``."""
    signature = dict(variant.signature)
    constants = dict(variant.constants)
    divisible = [n for n, kind in signature.items() if variant.aligned and kind.startswith("*")]
    for name, value in variant.int_args.items():
        kind = "" if name in constants else signature.get(name, "")
        if not re.fullmatch(r"[iu](8|16|32|64)", kind):
            raise CodegenError(
                f"{variant.kernel}: int_args names '{name}', which is not an integer argument "
                f"of the signature ({'a constant' if name in constants else kind or 'absent'})"
            )
        if value == 1:
            del signature[name]
            constants[name] = 1
        elif value % 16 == 0 and variant.aligned:
            divisible.append(name)
    return signature, constants, divisible


_USAGE = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, capability: int) -> dict[str, int]:
    """Registers and spills from the ptxas that ships with Triton (`-v`)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory(prefix="kompakt-ptx-") as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [get_ptxas(capability).path, f"-arch={arch}", "-v", path, "-o", path + ".cubin"],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise CodegenError(f"ptxas rejected the kernel for {arch}: {done.stderr[-2000:]}")
    registers = _USAGE.search(done.stderr)
    spills = _SPILLS.search(done.stderr)
    return {
        "registers": int(registers.group(1)) if registers else 0,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
    }


def _main() -> None:
    variants = [Variant(**v) for v in json.loads(sys.stdin.read())]
    rows = []
    for built in (_compile_one(v) for v in variants):
        row = asdict(built)
        row.pop("variant")
        rows.append(row)
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    _main()
