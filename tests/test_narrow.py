"""Narrow products (runtime/narrow.py): `weight @ rows.T` for a few rows equals nn.Linear to
float32 rounding, the swap is undone on leaving (also after an error), 'auto' takes the form
that times faster on this machine, and a bad mode is refused."""

from __future__ import annotations

import pytest
import torch

from m2r2core.errors import ConfigError
from m2r2core.runtime.narrow import MAX_ROWS, narrow_products, wanted


@pytest.fixture
def block():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.SiLU(),
                               torch.nn.Linear(96, 32, bias=False))


@pytest.mark.parametrize("rows", [1, 2, 3, MAX_ROWS, MAX_ROWS + 1, 40])
def test_equal_to_linear_to_rounding(block, rows):
    x = torch.randn(1, rows, 48)
    want = block(x)
    with narrow_products([block]):
        got = block(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_narrow_path_is_taken_only_for_a_few_rows(block, monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a.shape) or real_mm(a, b))
    with narrow_products([block]):
        block(torch.randn(3, 48))  # 2-D input: 3 rows
        block(torch.randn(1, 1, 48))
        block(torch.randn(1, MAX_ROWS + 1, 48))
    assert calls == [(96, 48), (32, 96)]  # the weight is the left operand


def test_swap_is_undone_after_the_block_and_after_an_error(block):
    linears = [block[0], block[2]]
    with pytest.raises(RuntimeError, match="boom"):
        with narrow_products([block]):
            assert all("forward" in vars(m) for m in linears)
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in linears)
    with narrow_products([block], enabled=False):
        assert not any("forward" in vars(m) for m in linears)


def test_auto_takes_the_form_that_times_faster_and_bad_modes_are_refused(block, monkeypatch):
    from m2r2core.runtime import narrow
    narrow._MEASURED.clear()
    found = narrow.measure([block])
    assert found["rows"] == 2 and found["plain_ms"] > 0 and found["narrow_ms"] > 0
    assert found["narrow_over_plain"] == pytest.approx(found["narrow_ms"] / found["plain_ms"])
    assert narrow.measure([block]) is found  # timed once per process
    assert wanted("auto", [block]) == (found["narrow_over_plain"] <= narrow.AUTO_MARGIN)
    for ratio, expected in ((0.5, True), (narrow.AUTO_MARGIN, True), (0.95, False), (2.0, False)):
        monkeypatch.setattr(narrow, "measure", lambda modules, r=ratio: {"narrow_over_plain": r})
        assert wanted("auto", [block]) is expected
    assert wanted("on", [block]) and not wanted("off", [block])
    with pytest.raises(ConfigError, match="narrow_verify"):
        wanted("sometimes", [block])
