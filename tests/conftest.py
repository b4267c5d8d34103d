"""Shared fixtures. Captures are cached per session: exporting a model takes seconds."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("KOMPAKT_VERIFY", "1")  # verify the IR after every pass in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset

import pytest  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. It is chosen when a
# kernel is decorated, so before any kompakt.codegen module is imported; ahead-of-time compiles for
# sm_80/sm_90 then happen in a subprocess without it (kompakt.codegen.aot).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

EXAMPLE_SHAPE = (2, 8)  # (batch, sequence) the tiny models are captured with
OTHER_SHAPE = (3, 5)  # a different shape every dynamic test also runs


def tokens(shape, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, tiny_models.VOCAB, shape, generator=generator)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """tiny(name) -> the random-init model (same weights every call)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = tiny_models.make(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def captured(tiny):
    """captured(name) -> the model's IR captured at EXAMPLE_SHAPE (compile() copies it)."""
    from kompakt.lowering import capture_module

    cache = {}

    def get(name: str):
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = capture_module(tiny(name), (tokens(EXAMPLE_SHAPE),))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer, inputs) for all-MiniLM-L6-v2 on the fixed sentence set."""
    from kompakt.eval.embeddings import SENTENCES
    from kompakt.models import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model, tokenizer, inputs


@pytest.fixture(scope="session")
def minilm_captured(minilm):
    from kompakt.lowering import capture_module

    model, _, inputs = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_module(model, inputs)
