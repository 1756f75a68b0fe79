"""Budget values: a ratio in (0, 1] (1 = full, "50%" accepted) or a whole key count >= 2; an empty option value
is an error, never a silent dense run."""
from __future__ import annotations

import pytest

from seqtool.errors import BadInputError
from seqtool.patches.budget import Budget
from seqtool.patches.spec import parse_attn_spec


def test_one_means_full_and_percent_is_a_ratio():
    assert Budget.parse(1.0).is_full and Budget.parse("1").is_full
    assert Budget.parse("50%").tokens(100) == 50 and Budget.parse("100%").is_full
    assert Budget.parse(2).tokens(100) == 2 and Budget.parse("48").tokens(100) == 48


@pytest.mark.parametrize("bad", [1.5, "1.5", 0, "0", -0.5, 2.5, "abc", "", "150%", float("nan")])
def test_bad_budgets_are_one_line_errors(bad):
    with pytest.raises(BadInputError, match="budget must be"):
        Budget.parse(bad)


def test_empty_option_value_is_an_error():
    with pytest.raises(BadInputError, match="empty value"):
        parse_attn_spec("block_topk:budget=")
