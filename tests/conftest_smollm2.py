"""Shared fixtures for the tests of the real model (a pytest plugin, not a conftest).

Test modules load it with ``pytest_plugins = ["conftest_smollm2"]``, so that
one session loads SmolLM2 once and the transformers reference at most once.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kqv import smollm2


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer): SmolLM2-135M-Instruct in float32 on the CPU. Do not modify it."""
    return smollm2.load_smollm2("cpu", torch.float32)


@pytest.fixture(scope="session")
def smol_model(smol):
    return smol[0]


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol[1]


@pytest.fixture(scope="session")
def smol_small(smol_model):
    """The first 4 layers of SmolLM2 with the real weights: enough for exactness tests, and fast."""
    small = copy.deepcopy(smol_model)
    small.layers = small.layers[:4]
    small.config = small.config.replace(num_layers=4, name=small.config.name + " (first 4 layers)")
    return small


@pytest.fixture(scope="session")
def reference():
    """(model, tokenizer) of Hugging Face transformers' own GGUF loading of the same file (~45 s)."""
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF files without it)
    except ImportError:
        pytest.fail(
            "the transformers reference needs the 'accelerate' package to load a GGUF file: "
            "pip install accelerate==1.15.0"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = smollm2.gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer
