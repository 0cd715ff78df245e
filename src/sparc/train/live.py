"""Metric logging for training: a small protocol, a DVCLive implementation and an in-memory one.

DVCLive is created with ``dvcyaml=False`` (the pipeline declares ``metrics:``/``plots:`` in
``dvc.yaml`` by hand) and ``save_dvc_exp=False`` (inside ``dvc repro``/``dvc exp run`` DVCLive
ignores it anyway; outside DVC it would otherwise create an experiment). Outputs under the
reports directory::

    metrics.json                 latest value of every metric (nested by '/'), plus "step"
    plots/metrics/<name>.tsv     one row (step, value) per logged step

Metric names must not be both a leaf and a group (``loss`` and ``loss/self``): DVCLive nests the
summary by '/'.

Partial runs. ``dvc metrics show`` presents whatever ``reports/train/metrics.json`` holds as the
stage's results, so a run never logs there directly: the train stage logs into ``live/`` inside
the run's checkpoint directory and :func:`publish` moves the files into the reports directory only
once training (and the validation pass) finished, after :func:`clear_reports` removed the previous
run's files when this run started. A killed or ``max_steps``-stopped run thus leaves no metrics
in the reports directory, neither its own partial ones nor stale ones of an earlier run (as
``dvc repro`` too removes a stage's outputs before running it); its progress is in
``<checkpoints_dir>/<key>/live/``. A resumed run starts that directory afresh and replays the
logged history from the checkpoint (see :mod:`sparc.train.loop`), so the published files equal
those of an uninterrupted run byte for byte. Marking partial metrics instead (a ``finished: false``
entry) would still show their numbers as the stage's results.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

# What LiveLogger writes into its directory (DVCLive with dvcyaml=False, report=None).
OUTPUTS = ("metrics.json", "plots")


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


def clear_reports(reports_dir: str | Path) -> None:
    """Remove the :data:`OUTPUTS` of an earlier run from ``reports_dir`` (other files stay)."""
    for name in OUTPUTS:
        path = Path(reports_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def publish(live_dir: str | Path, reports_dir: str | Path) -> None:
    """Move a finished run's :data:`OUTPUTS` from ``live_dir`` into ``reports_dir``, replacing any
    there (a rename when both are on one file system)."""
    reports_dir = Path(reports_dir)
    clear_reports(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        if (Path(live_dir) / name).exists():
            shutil.move(Path(live_dir) / name, reports_dir / name)
