import numpy as np
import pytest


@pytest.fixture(scope="session")
def byte_tok():
    from seqtool.zoo.presets import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(scope="session")
def filler(byte_tok):
    from seqtool.eval.runner import heldout_tokens

    return heldout_tokens(byte_tok, max_chars=60_000)


@pytest.fixture(scope="session")
def tiny():
    import torch

    from seqtool.arch.io import load_model

    torch.manual_seed(0)
    return load_model("tiny-llama", dtype="fp32", device="cpu")
