"""The command-line runs turn numpy's huge-page advice off, unless the environment decides."""

import numpy as np
import pytest

from simulator.huge_pages import avoid_huge_pages

switch = np._core.multiarray._set_madvise_hugepage


@pytest.fixture
def restore_advice():
    before = switch(True)
    switch(before)
    yield
    switch(before)


def test_advice_is_off_after_avoid_huge_pages(monkeypatch, restore_advice):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    switch(True)
    assert avoid_huge_pages()
    assert switch(True) is False  # it was off


@pytest.mark.parametrize(("value", "off"), [("1", False), ("0", True)])
def test_the_environment_variable_wins(monkeypatch, restore_advice, value, off):
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", value)
    switch(True)
    assert avoid_huge_pages() is off
    assert switch(True) is True  # left as it was
