"""The row groups and step counts of advantage-scored rows (gradlens.advantages), on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.advantages import GROUP_ORDER, advantage_groups, advantage_metrics
from gradlens.runs import schema


def test_groups_by_sign_may_be_empty_and_skip_nan():
    groups = advantage_groups(torch.tensor([0.5, -1.0, 0.0, float("nan"), 2.0]))
    assert tuple(groups) == GROUP_ORDER  # the negative group last: the recorder's remainder
    assert groups[schema.POSITIVE].tolist() == [0, 4]
    assert groups[schema.NEGATIVE].tolist() == [1] and groups[schema.ZERO].tolist() == [2]  # row 3 (NaN) is in none
    assert advantage_groups(torch.tensor([1.0, 2.0]))[schema.NEGATIVE].numel() == 0


def test_per_token_advantages_are_refused():
    with pytest.raises(ValueError, match="one advantage per completion"):
        advantage_groups(torch.zeros(4, 3))


def test_counts_and_prompt_groups():
    # prompt 7: one positive, one negative; prompt 8: all zero (no signal); prompt 9: two positives, one negative
    adv = [torch.tensor([1.0, -1.0, 0.0, 0.0]), torch.tensor([0.5, 0.25, -0.75])]
    ids = [torch.tensor([7, 7, 8, 8]), torch.tensor([9, 9, 9])]
    m = advantage_metrics(adv, ids)
    assert (m[schema.COUNT_POSITIVE], m[schema.COUNT_NEGATIVE], m[schema.COUNT_ZERO]) == (3, 2, 2)
    assert m[schema.ADVANTAGE_POSITIVE_MEAN] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert m[schema.ADVANTAGE_NEGATIVE_MEAN] == pytest.approx(-0.875)
    assert (m[schema.PROMPT_GROUPS], m[schema.PROMPT_GROUPS_MIXED], m[schema.PROMPT_GROUPS_NO_SIGNAL]) == (3, 2, 1)
    assert m[schema.POSITIVE_PER_PROMPT] == pytest.approx(1.0) and m[schema.NEGATIVE_PER_PROMPT] == pytest.approx(2 / 3)
    none = advantage_metrics([torch.tensor([0.0, 0.0])], [])
    assert math.isnan(none[schema.ADVANTAGE_POSITIVE_MEAN]) and schema.PROMPT_GROUPS not in none
