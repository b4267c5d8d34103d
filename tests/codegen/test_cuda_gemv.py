"""The CUDA C W4A16 GEMV: source, nvcc builds for sm_80/sm_90, index math (emulated), heuristic.

Without a GPU: `emulate` replays the kernel's grid, offsets, nibble decoding and reduction order
in torch; `host_run` compiles the rendered kernel text itself with g++ (a shim header, a
std::thread per CUDA thread) and runs it; both are compared with the reference. nvcc compiles
the device code for sm_80 and sm_90 (no spills), and a golden file pins the source.
Regenerate the golden file with KOMPAKT_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kompakt.codegen.cuda_gemv import (
    Config,
    build_host,
    choose_config,
    compile_ptx,
    cost,
    emulate,
    host_run,
    kernel_name,
    launch_cuda_gemv,
    load,
    parse_resource_usage,
    reduce_name,
    render,
    render_kernel,
)
from kompakt.codegen.cuda_gemv.spec import BANDWIDTH, LATENCY_S
from kompakt.codegen.dequant_matmul import dequant_matmul_reference, pack, unpack
from kompakt.errors import CodegenError

GOLDEN_CONFIG = Config(threads=128, cols=2, split_k=4, m_tile=4, k_tile=256, unroll=4)
GOLDEN = Path(__file__).parent / "golden" / f"cuda_gemv_{GOLDEN_CONFIG.name}.cu"


def packed_weight(k, n, group_size, signed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if signed:
        q = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8)
    else:
        q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    groups = -(-k // group_size)
    scale = torch.rand(groups, n, generator=g) * 0.1 + 0.01
    zero = torch.randint(0, 16, (groups, n), generator=g).float()
    zero = zero + torch.rand(groups, n, generator=g)  # fractional zero points too
    return pack(q, scale, zero, 4, group_size)


def inputs(shape, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).half(), torch.randn(n, generator=g).half()


# ---- source ------------------------------------------------------------------------------------


def test_import_needs_no_triton_or_cpp_extension():
    code = (
        "import sys, kompakt.codegen.cuda_gemv\n"
        "assert 'triton' not in sys.modules\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_render_matches_golden():
    source = render(GOLDEN_CONFIG)
    if os.environ.get("KOMPAKT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(source)
    assert source == GOLDEN.read_text(), "source changed; KOMPAKT_UPDATE_GOLDEN=1 to accept"


def test_render_is_deterministic_and_config_specific():
    a, b = render(GOLDEN_CONFIG), render(Config(**vars(GOLDEN_CONFIG)))
    assert a == b
    other = Config(threads=64, cols=1, split_k=1, m_tile=2, k_tile=64, unroll=2, group_size=32)
    assert render(other) != a
    kernel = render_kernel(GOLDEN_CONFIG)
    assert a.startswith(kernel) and "torch/extension.h" not in kernel
    assert f"void __launch_bounds__(KG_THREADS) {kernel_name(GOLDEN_CONFIG)}(" in kernel
    assert "static constexpr int KG_SPLIT_K = 4;" in kernel
    assert reduce_name(GOLDEN_CONFIG) in kernel


# ---- nvcc, no GPU ------------------------------------------------------------------------------

BUILD_CONFIGS = [
    choose_config(1, 4096, 4096, "sm_90"),  # M = 1 decode: cols 4, split-K
    choose_config(16, 4096, 4096, "sm_90"),  # M = 16: m_tile 16, ALU-bound regime
    Config(threads=64, cols=3, split_k=1, m_tile=3, k_tile=48, unroll=2, group_size=32),
]


@pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc"
)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("config", BUILD_CONFIGS, ids=lambda c: c.name)
def test_nvcc_builds_without_spills(config, arch):
    ptx, report = compile_ptx(config, arch)
    assert f".target {arch}" in ptx
    assert f".entry {kernel_name(config)}(" in ptx and f".entry {reduce_name(config)}(" in ptx
    assert "ld.global.nc" in ptx  # qweight through the read-only path (__ldg)
    usage = parse_resource_usage(report)
    main = usage[kernel_name(config)]
    print(
        f"\n{kernel_name(config)} {arch}: {main}\n{reduce_name(config)} {arch}: "
        f"{usage[reduce_name(config)]}"
    )
    for name, u in usage.items():
        assert u.spill_stores == 0 and u.spill_loads == 0, f"{name} spills on {arch}: {u}"
    assert main.shared_bytes == config.shared_bytes
    assert main.registers <= 255


def test_parse_resource_usage():
    text = (
        "ptxas info    : Compiling entry function 'k1' for 'sm_90'\n"
        "ptxas info    : Function properties for k1\n"
        "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem\n"
    )
    u = parse_resource_usage(text)["k1"]
    assert (u.registers, u.spill_stores, u.spill_loads, u.shared_bytes) == (40, 8, 4, 1024)


# ---- index math, emulated ----------------------------------------------------------------------

# (x shape, N, K, Config(threads, cols, split_k, m_tile, k_tile, unroll, group_size)):
# K is never a multiple of the group, the step or the split.
EMULATED = [
    ((1, 100), 40, 100, Config(32, 1, 3, 1, 32, 2, 16)),
    ((3, 203), 70, 203, Config(32, 2, 2, 2, 64, 4, 32)),
    ((5, 77), 33, 77, Config(32, 3, 1, 4, 16, 1, 8)),
    ((2, 3, 61), 50, 61, Config(64, 1, 2, 8, 32, 2, 48)),  # x [2, 3, K]: M = 6 in an 8-row tile
    ((1, 80), 17, 80, Config(32, 1, 3, 1, 64, 8, 64)),  # 10 packed rows, chunks of 8: split 2 empty
    ((1, 1), 1, 1, Config(32, 1, 1, 1, 8, 1, 8)),
]
CASE_IDS = [f"x{list(c[0])}_n{c[1]}_{c[3].name}" for c in EMULATED]
# choose_config's picks at N = 130, K = 200: column slices and K splits that do not divide evenly
CHOSEN = [(m, choose_config(m, 130, 200, "sm_90", group_size=32)) for m in (1, 4, 16)]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("case", EMULATED, ids=CASE_IDS)
def test_emulated_kernel_matches_reference(case, signed):
    shape, n, k, config = case
    packed = packed_weight(k, n, config.group_size, signed)
    x, bias = inputs(shape, n)
    exact = x.float() @ unpack(packed) + bias.float()
    got = emulate(x, packed, bias, config, out_dtype=torch.float32)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-4)
    y = emulate(x, packed, bias, config)
    torch.testing.assert_close(y, dequant_matmul_reference(x, packed, bias), rtol=1e-3, atol=1e-2)
    y_nobias = emulate(x, packed, None, config, out_dtype=torch.float32)
    torch.testing.assert_close(y_nobias, exact - bias.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,config", CHOSEN, ids=[c.name for _, c in CHOSEN])
def test_emulated_chosen_config(m, config):
    packed = packed_weight(200, 130, 32)
    x, bias = inputs((m, 200), 130)
    want = dequant_matmul_reference(x, packed, bias)
    torch.testing.assert_close(emulate(x, packed, bias, config), want, rtol=1e-3, atol=1e-2)


# ---- the kernel source itself, run on the CPU ----------------------------------------------------


@pytest.fixture(scope="module")
def host():
    if shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("needs a C++ compiler")
    build_host([case[3] for case in EMULATED] + [c for _, c in CHOSEN])  # one g++ run, ~2 s


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("case", EMULATED, ids=CASE_IDS)
def test_kernel_source_on_host_matches_reference(host, case, signed):
    shape, n, k, config = case
    packed = packed_weight(k, n, config.group_size, signed)
    x, bias = inputs(shape, n)
    for b in (bias, None):
        y = host_run(x, packed, b, config)
        assert y.shape == (*shape[:-1], n) and y.dtype == torch.float16
        torch.testing.assert_close(y, dequant_matmul_reference(x, packed, b), rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(y, emulate(x, packed, b, config), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("m,config", CHOSEN, ids=[c.name for _, c in CHOSEN])
def test_chosen_config_source_on_host(host, m, config):
    packed = packed_weight(200, 130, 32)
    x, bias = inputs((m, 200), 130)
    want = dequant_matmul_reference(x, packed, bias)
    torch.testing.assert_close(host_run(x, packed, bias, config), want, rtol=1e-3, atol=1e-2)


# ---- heuristic and cost ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_choose_config_regimes(arch):
    c = choose_config(1, 4096, 4096, arch)
    assert (c.m_tile, c.cols, c.unroll) == (1, 4, 8) and c.split_k > 1
    # Little's law: qweight bytes in flight cover most of bandwidth x latency
    assert 4096 * c.split_k * c.unroll * 4 >= 0.8 * BANDWIDTH[arch] * LATENCY_S
    c16 = choose_config(16, 4096, 4096, arch)
    assert (c16.m_tile, c16.cols) == (16, 1)
    assert choose_config(4, 4096, 4096, arch).m_tile == 4
    assert choose_config(1, 4096, 4096, arch, group_size=32).unroll == 4
    assert choose_config(1, 4096, 4096, arch, group_size=4096).unroll == 8  # per-channel
    assert choose_config(1, 64, 16, arch).split_k == 1  # two packed rows: nothing to split


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("n,k", [(1, 1), (4096, 4096), (11008, 4096), (4096, 11008), (96, 520)])
def test_choose_config_never_leaves_a_split_empty(m, n, k):
    c = choose_config(m, n, k, "sm_90", group_size=64)
    rows = -(-k // 8)
    assert (c.split_k - 1) * c.chunk_rows(k) < rows <= c.split_k * c.chunk_rows(k)
    assert c.shared_bytes <= 48 * 1024


def test_cost():
    flops, moved = cost(1, 4096, 4096, 128)
    assert flops == 2 * 4096 * 4096
    weight = 4096 * 4096 // 2 + 2 * 2 * 32 * 4096
    assert moved == weight + 2 * 4096 + 2 * 4096
    assert cost(1, 4096, 4096, 128, split_k=8)[1] == moved + 8 * 8 * 4096


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"threads": 48}, "threads"),
        ({"cols": 0}, "cols"),
        ({"m_tile": 16, "cols": 4}, "cols"),
        ({"unroll": 3}, "unroll"),
        ({"k_tile": 20}, "k_tile"),
        ({"group_size": 36}, "group_size"),
        ({"m_tile": 16, "k_tile": 2048, "cols": 1}, "shared memory"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(CodegenError, match=match):
        Config(**kwargs)


def test_choose_config_errors():
    with pytest.raises(CodegenError, match="sm_75"):
        choose_config(1, 64, 64, "sm_75")
    with pytest.raises(CodegenError, match="group_size 12"):
        choose_config(1, 64, 64, group_size=12)


def test_bad_inputs_name_the_argument():
    packed = packed_weight(64, 32, 32)
    x, bias = inputs((2, 64), 32)
    cases = [
        ((x.float(), packed, None), "x must be float16"),
        ((x[:, :60], packed, None), r"x shape \[2, 60\] must be \[..., 64\]"),
        ((x, packed, bias.float()), "bias torch.float32"),
        ((x, packed, bias[:16]), r"bias .* must be float16 \[32\]"),
        (
            (x, pack(torch.zeros(64, 32, dtype=torch.int8), torch.ones(2, 32), None, 8, 32), None),
            "8-bit",
        ),
    ]
    for args, match in cases:
        with pytest.raises(CodegenError, match=match):
            launch_cuda_gemv(*args)
    with pytest.raises(CodegenError, match="group_size 64"):
        launch_cuda_gemv(x, packed, config=Config(group_size=64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_needs_cuda():
    packed = packed_weight(64, 32, 32)
    x, _ = inputs((1, 64), 32)
    with pytest.raises(CodegenError, match="CUDA"):
        launch_cuda_gemv(x, packed)
    with pytest.raises(CodegenError, match="CUDA"):
        load(GOLDEN_CONFIG)


# ---- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_matches_reference(m, with_bias):
    k = n = 4096
    packed = packed_weight(k, n, 128).to("cuda")
    x, bias = inputs((m, k), n)
    x, bias = x.cuda(), bias.cuda() if with_bias else None
    y = launch_cuda_gemv(x, packed, bias)
    torch.testing.assert_close(y, dequant_matmul_reference(x, packed, bias), rtol=2e-3, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", EMULATED, ids=CASE_IDS)
def test_gpu_matches_emulation_on_odd_shapes(case):
    shape, n, k, config = case
    packed = packed_weight(k, n, config.group_size)
    x, bias = inputs(shape, n)
    want = emulate(x, packed, bias, config)
    y = launch_cuda_gemv(x.cuda(), packed.to("cuda"), bias.cuda(), config)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-3, atol=1e-2)
