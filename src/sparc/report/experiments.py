"""Multi-seed grids as DVC experiments: the grids, their command lines, starting them, and
reading them back.

:func:`grid_overrides` lists the runs of a grid (one DVC experiment per configuration and seed,
named ``<prefix>-<config>-s<seed>``); ``python -m sparc ablation`` runs the paper's ablation
(:data:`ABLATION`: Global/Local TopK x lambda in {0, 1}, plus the two USAE variants) and
``python -m sparc sweep k=8,16,32`` any other grid, each with ``dvc exp run --temp`` (the
workspace is left alone) or ``--queue`` (then ``dvc queue start -j N``); :func:`dvc_busy` refuses
to start while DVC runs in the workspace. :func:`experiment_records` reads ``dvc exp show
--json`` back; :func:`exp_show_command` is ``python -m sparc show``'s ``dvc exp show``. The
tables, claims and figure made from the records are :mod:`sparc.report.ablation`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparc.presets import override_literal

# The ablation of the paper (method.md section 5) plus USAE: name -> params.yaml overrides.
ABLATION: dict[str, dict[str, object]] = {
    "sparc": {"topk": "global", "lambda": 1.0, "method": "sparc"},
    "global-lam0": {"topk": "global", "lambda": 0.0, "method": "sparc"},
    "local-lam1": {"topk": "local", "lambda": 1.0, "method": "sparc"},
    "local-lam0": {"topk": "local", "lambda": 0.0, "method": "sparc"},
    "usae": {"topk": "local", "lambda": 1.0, "method": "usae"},
    "usae-paper": {"topk": "local", "lambda": 1.0, "method": "usae_paper"},
}
# Per-stream alignment options of SPARC (docs/alignment.md): the
# stream-subset rule's keep probability and the consistency term's weight, each against SPARC.
ALIGNMENT: dict[str, dict[str, object]] = {
    "sparc": {"train.subset_keep": 1.0, "train.consistency": 0.0},
    "subset-0.25": {"train.subset_keep": 0.25, "train.consistency": 0.0},
    "subset-0.5": {"train.subset_keep": 0.5, "train.consistency": 0.0},
    "subset-0.75": {"train.subset_keep": 0.75, "train.consistency": 0.0},
    "consistency-1": {"train.subset_keep": 1.0, "train.consistency": 1.0},
}
# Text-guided localisation (the `localise` stage) of SPARC against Local TopK and lambda = 0.
LOCALISE: dict[str, dict[str, object]] = {c: ABLATION[c] for c in ("sparc", "local-lam1", "global-lam0")}
GRIDS: dict[str, dict[str, dict[str, object]]] = {"ablation": ABLATION, "alignment": ALIGNMENT, "localise": LOCALISE}
def grid_of(prefix: str) -> str:
    """The grid of :data:`GRIDS` that experiments named ``prefix`` run: the longest grid name
    that starts ``prefix`` (``alignment-clipart`` -> ``alignment``), else ``ablation``."""
    names = [g for g in GRIDS if prefix == g or prefix.startswith(g + "-")]
    return max(names, key=len) if names else "ablation"


def grid_overrides(
    configs: dict[str, dict[str, object]], seeds: Sequence[int], prefix: str, extra: Sequence[str] = ()
) -> list[tuple[str, list[str]]]:
    """``[(experiment name, ["key=value", ...])]``, one per configuration and seed; ``extra``
    overrides (``"data.dataset=clipart"``) go to every run."""
    runs = []
    for name, overrides in configs.items():
        for seed in seeds:
            sets = [f"{k}={override_literal(v)}" for k, v in overrides.items()] + list(extra) + [f"seed={seed}"]
            runs.append((f"{prefix}-{name}-s{seed}", sets))
    return runs


def parse_sweep(spec: str) -> dict[str, dict[str, object]]:
    """``"k=8,16,32"`` -> ``{"k8": {"k": 8}, "k16": {"k": 16}, ...}`` (numbers parsed as YAML
    would: ``8`` an int, ``1.0`` a float)."""
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"sweep: expected key=v1,v2,..., got {spec!r}")
    out: dict[str, dict[str, object]] = {}
    for raw in values.split(","):
        raw = raw.strip()
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out[f"{key.split('.')[-1]}{raw}"] = {key: value}
    return out


def experiment_commands(runs: Iterable[tuple[str, list[str]]], queue: bool) -> list[list[str]]:
    """``dvc exp run`` command lines for ``runs`` (``--temp`` to run now, ``--queue`` to queue)."""
    cmds = []
    for name, sets in runs:
        cmd = ["dvc", "exp", "run", "--queue" if queue else "--temp", "-n", name]
        for s in sets:
            cmd += ["-S", s]
        cmds.append(cmd)
    return cmds


# Where DVC records a running workspace experiment (`dvc exp run` without --queue/--temp: its
# process id) and the repository lock that DVC commands changing the workspace hold.
EXP_WORKSPACE_PID = Path(".dvc/tmp/exps/run/workspace/workspace.json")
REPO_LOCK = Path(".dvc/tmp/lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def dvc_busy(root: str | Path = ".") -> str | None:
    """What DVC is running in the workspace at ``root``, or None: a workspace ``dvc exp run``
    (its pid file names a live process), or any command holding the repository lock (tested with
    a non-blocking ``flock``, as DVC takes it, and released at once; not checked without fcntl).

    A second ``dvc exp run`` started meanwhile writes its ``-S`` values into ``params.yaml`` before
    failing on the lock, which leaves the workspace's params out of step with its outputs."""
    root = Path(root)
    try:
        pid = int(json.loads((root / EXP_WORKSPACE_PID).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pid = 0
    if pid > 0 and _alive(pid):
        return f"a workspace `dvc exp run` (process {pid}, {EXP_WORKSPACE_PID})"
    try:
        import fcntl
    except ImportError:
        return None
    try:
        with (root / REPO_LOCK).open("rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except FileNotFoundError:
        return None
    except BlockingIOError:
        return f"a DVC command holding {REPO_LOCK}"
    return None


def run_experiments(cmds: list[list[str]], echo: Callable[[str], None] = print) -> list[str]:
    """Run the commands one after the other; returns the names of the runs that failed."""
    failed = []
    for i, cmd in enumerate(cmds, 1):
        name = cmd[cmd.index("-n") + 1]
        echo(f"[{i}/{len(cmds)}] {name}: {' '.join(cmd[6:])}")
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    return failed


# --------------------------------------------------------------------------- reading experiments


@dataclass(frozen=True)
class Record:
    """One experiment: its name, flattened params.yaml and flattened metrics.json."""

    name: str
    params: dict[str, object]
    metrics: dict[str, object]
    timestamp: str = ""


def flatten(obj: object, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, object] = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _records_in(node: object) -> Iterable[Record]:
    if isinstance(node, list):
        for item in node:
            yield from _records_in(item)
        return
    if not isinstance(node, dict):
        return
    data = node.get("data")
    if isinstance(data, dict) and node.get("name") and isinstance(data.get("metrics"), dict):
        params = (data.get("params") or {}).get("params.yaml", {}).get("data")
        metrics: dict[str, object] = {}
        for entry in data["metrics"].values():  # every metrics file, merged (same key paths)
            metrics.update(flatten((entry or {}).get("data") or {}))
        if params and metrics:
            yield Record(str(node["name"]), flatten(params), metrics, str(data.get("timestamp") or ""))
    for key in ("experiments", "revs"):
        yield from _records_in(node.get(key))


def experiment_records(show_json: object) -> list[Record]:
    """Every named experiment with params and metrics in ``dvc exp show --json`` output (the
    metrics of all its metrics files, flattened to dotted keys); of several experiments with one
    name (run from different commits), the newest."""
    seen: dict[str, Record] = {}
    for rec in _records_in(show_json):
        if rec.name not in seen or rec.timestamp > seen[rec.name].timestamp:
            seen[rec.name] = rec
    return list(seen.values())


def dvc_experiments(cwd: str | Path = ".", all_commits: bool = False) -> list[Record]:
    """:func:`experiment_records` of ``dvc exp show --json`` run in ``cwd``: the experiments of
    the current commit, or of every commit (``-A``) with ``all_commits``."""
    cmd = ["dvc", "exp", "show", "--json", *(["-A"] if all_commits else [])]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ValueError(f"dvc exp show --json failed: {proc.stderr.strip().splitlines()[-1:]}")
    return experiment_records(json.loads(proc.stdout))


# random_weights (the number of streams from random-weight models, headline.json) appears only
# when a run shown has it: such a run's numbers are no result.
SHOW_COLUMNS = (
    "random_weights",
    "jaccard_d0", "jaccard_live", "jaccard_ps_live", "mixed", "mixed_ps", "nmse_cross_lf", "r1_cap2img",
    "seed", "lambda", "topk", "method",
)


def exp_show_command(extra: Sequence[str] = ()) -> list[str]:
    """``dvc exp show`` restricted to :data:`SHOW_COLUMNS` (``--drop`` everything but the
    experiment name, ``--keep`` those columns), plus ``extra`` arguments (e.g. ``-A``)."""
    keep = "^(" + "|".join(re.escape(c) for c in SHOW_COLUMNS) + ")$"
    return ["dvc", "exp", "show", "--no-pager", "--drop", "^(?!Experiment$).*", "--keep", keep, *extra]
