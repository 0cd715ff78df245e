"""Metric logging for training: a small protocol, a DVCLive implementation and an in-memory one.

DVCLive is created with ``dvcyaml=False`` (the pipeline declares ``metrics:``/``plots:`` in
``dvc.yaml`` by hand) and ``save_dvc_exp=False`` (inside ``dvc repro``/``dvc exp run`` DVCLive
ignores it anyway; outside DVC it would otherwise create an experiment). Outputs under the
reports directory::

    metrics.json                 latest value of every metric (nested by '/'), plus "step"
    plots/metrics/<name>.tsv     one row (step, value) per logged step

Metric names must not be both a leaf and a group (``loss`` and ``loss/self``): DVCLive nests the
summary by '/'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class MetricLogger(Protocol):
    """Receives the averaged training metrics of each logging step."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class MemoryLogger:
    """Keeps every logged ``(step, metrics)`` in :attr:`history` (tests, notebooks)."""

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, float]]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append((step, dict(metrics)))

    def close(self) -> None:
        pass

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1][1] if self.history else {}


class LiveLogger:
    """Logs to DVCLive in ``reports_dir`` (cleared at start, as DVCLive does without resume)."""

    def __init__(self, reports_dir: str | Path) -> None:
        from dvclive import Live

        self.live = Live(str(reports_dir), dvcyaml=False, save_dvc_exp=False, report=None)

    @property
    def metrics_file(self) -> Path:
        return Path(self.live.metrics_file)

    @property
    def plots_dir(self) -> Path:
        return Path(self.live.plots_dir) / "metrics"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()
