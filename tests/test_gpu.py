"""GPU checks (skipped without CUDA): the reference runtime runs the same IR on the GPU."""

import pytest
import torch
from conftest import OTHER_SHAPE, tokens
from tiny_models import reference_output

import kompakt

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("target", ["cpu", "a100-w4"])
def test_reference_backend_on_cuda_matches_cpu(captured, tiny, target):
    on_gpu = kompakt.compile(captured("llama"), target=target, backend="reference", device="cuda")
    on_cpu = kompakt.compile(captured("llama"), target=target, backend="reference", device="cpu")
    ids = tokens(OTHER_SHAPE, seed=11)
    out = on_gpu(ids.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), on_cpu(ids), rtol=1e-4, atol=1e-4)
    if target == "cpu":
        torch.testing.assert_close(
            out.cpu(), reference_output(tiny("llama"), ids), rtol=1e-4, atol=1e-4
        )
