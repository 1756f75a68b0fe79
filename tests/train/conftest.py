from __future__ import annotations

import pytest

DOMAIN = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n\n"
          "for i in range(10):\n    total += i\n\n")


@pytest.fixture
def domain_file(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text(DOMAIN * 60)
    return path
