"""Fixtures of the dataset tests."""

from __future__ import annotations

import pytest


@pytest.fixture()
def any_split_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare` without its minimum split sizes, for tests of a few rows about something else."""
    import sparc.data.prepared

    monkeypatch.setattr(sparc.data.prepared, "MIN_SPLIT_ROWS", {})
