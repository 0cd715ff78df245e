"""How far the default pipeline's results move when the CPU's kernels change.

Clones this repository (its HEAD) once per setting, runs the whole `dvc repro` in each clone with
the setting's environment variables (e.g. ``MKL_ENABLE_INSTRUCTIONS=SSE4_2``: the kernels of
another CPU, on this one), and prints, per stage, whether its outputs are byte-identical between
the runs (from the clones' dvc.lock), then every headline metric (reports/headline.json) of each
run with the largest absolute difference. Both runs use this checkout's virtual environment.

    python benchmarks/kernel_spread.py                          # as is vs SSE4.2 MKL + generic ATen
    python benchmarks/kernel_spread.py --setting "" --setting "OMP_NUM_THREADS=1"
    python benchmarks/kernel_spread.py --compare RUN_A RUN_B    # two finished runs, no new ones

About 25 minutes per run on 2 cores (the extraction of the default data dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ["", "MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default"]


def run_pipeline(workdir: Path, name: str, setting: str) -> Path:
    """Clone HEAD into ``workdir/name`` and run ``dvc repro`` there under ``setting``
    (space-separated ``VAR=value`` pairs); returns the clone."""
    clone = workdir / name
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for key, value in (("user.name", "kernel-spread"), ("user.email", "kernel-spread@localhost")):
        subprocess.run(["git", "config", key, value], cwd=clone, check=True)
    env = dict(os.environ, PYTHONPATH=str(clone / "src"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.update(pair.split("=", 1) for pair in setting.split())
    start = time.perf_counter()
    with (clone / "repro.log").open("w") as log:
        done = subprocess.run(["dvc", "repro"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"error: dvc repro failed under {setting or 'no setting'} (see {clone / 'repro.log'})")
    print(f"{name}: dvc repro under [{setting or 'as is'}] took {time.perf_counter() - start:.0f} s", flush=True)
    return clone


def stage_outputs(clone: Path) -> dict[str, dict[str, str]]:
    """Stage -> {output path: md5} from the clone's dvc.lock."""
    stages = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o.get("md5", "") for o in stage.get("outs", [])} for name, stage in stages.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", help="'VAR=value ...' for one run (repeat; default: as is, "
                    "and MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default)")
    ap.add_argument("--workdir", type=Path, help="where the clones go (default: a temporary directory, kept)")
    ap.add_argument("--compare", type=Path, nargs="+", help="only compare these finished runs (clones after dvc repro)")
    args = ap.parse_args()
    if args.compare:
        clones, workdir = args.compare, None
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sparc-kernel-spread-"))
        clones = [run_pipeline(workdir, f"run{i}", s) for i, s in enumerate(args.setting or DEFAULT_SETTINGS)]

    outs = [stage_outputs(c) for c in clones]
    print("\nstage outputs byte-identical across the runs:")
    for stage in outs[0]:
        same = all(o.get(stage) == outs[0][stage] for o in outs[1:])
        print(f"  {stage:<18}{'yes' if same else 'no'}")

    headlines = [json.loads((c / "reports" / "headline.json").read_text()) for c in clones]
    print(f"\n{'metric':<18}" + "".join(f"{'run' + str(i):>12}" for i in range(len(clones))) + f"{'max |diff|':>12}")
    for key, value in headlines[0].items():
        if not isinstance(value, (int, float)):
            continue
        values = [h[key] for h in headlines]
        print(f"{key:<18}" + "".join(f"{v:12.6f}" for v in values) + f"{max(values) - min(values):12.2e}")
    if workdir:
        print(f"\nclones kept in {workdir}")


if __name__ == "__main__":
    main()
