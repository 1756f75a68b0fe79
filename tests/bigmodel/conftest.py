from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def tiny_dir(tmp_path_factory):
    """tiny-llama written to disk by the streamed preset save, in 30 KB shards (17 files)."""
    from seqtool.zoo.save import save_preset

    out = tmp_path_factory.mktemp("bigmodel") / "tiny-llama"
    save_preset("tiny-llama", out, max_shard_bytes=30_000)
    return out


@pytest.fixture(scope="package")
def tiny_qwen2_dir(tmp_path_factory):
    """tiny-qwen2 (tied embeddings, q/k/v biases) on disk."""
    from seqtool.zoo.save import save_preset

    out = tmp_path_factory.mktemp("bigmodel") / "tiny-qwen2"
    save_preset("tiny-qwen2", out, max_shard_bytes=30_000)
    return out
