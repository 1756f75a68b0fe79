from __future__ import annotations

import pytest
import torch

from convert_helpers import token_ids


@pytest.fixture
def ids() -> torch.Tensor:
    """(2, 24) fixed token ids inside every tiny preset's vocabulary."""
    return token_ids()
