"""`dvc exp run` and the download cache, end to end in a copy of the repository: a killed
experiment resumes its download with Range requests and fetches no finished file again, and
switching `data.dataset` in an experiment keeps the other dataset's download.

DVC deletes a stage's outputs before running it and `dvc exp run` restores the workspace, so
partial and finished files live in the download cache beside the output
(`data/raw/<dataset>.cache`, sparc.data.download).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from sparc.data import openimages as oi
from tests.data.remote_fixtures import (
    SLOW_PIECE,
    coco_files,
    noise_jpeg,
    oi_image_id,
    openimages_files,
    serve_mirror,
    wait_for,
)
from tests.e2e import command_env, committed_copy, run

pytestmark = pytest.mark.slow


def download_repo(dst: Path, base_url: str) -> Path:
    """A committed copy of the repository set to download openimages from ``base_url``."""

    def edit(raw: dict) -> dict:
        raw["data"]["dataset"] = "openimages"
        raw["download"].update(base_url=base_url, workers=4)
        return raw

    return committed_copy(dst, edit)


def test_killed_exp_run_resumes_and_switching_dataset_keeps_the_download(tmp_path: Path) -> None:
    tree = openimages_files()
    big = oi.image_path("train", oi_image_id("train", 0))
    tree[big] = noise_jpeg(1_000_000)
    with serve_mirror({"openimages": tree, "coco": coco_files()}) as srv:
        big_url = f"/openimages/{big}"
        srv.delay[big_url] = 0.2  # about 15 s for the whole image
        repo = download_repo(tmp_path / "repo", srv.url)

        def part_size() -> int:
            """Bytes of the large image's part, wherever the download keeps it."""
            return max((p.stat().st_size for p in (repo / "data").rglob(f"{Path(big).name}.part")), default=0)

        with (tmp_path / "killed.log").open("w") as log:
            proc = subprocess.Popen(["dvc", "exp", "run", "-n", "oi-killed", "download"], cwd=repo, env=command_env(),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                others = [f"/openimages/{p}" for p in tree if p != big]
                wait_for(lambda: all(srv.requests(p) for p in others) and part_size() >= 2 * SLOW_PIECE,
                         "the large image's part", timeout_s=120)
                os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of dvc and the stage
            finally:
                proc.wait(timeout=30)
        srv.delay.clear()
        before = len(srv.log)
        run(["dvc", "exp", "run", "-n", "oi-again", "download"], repo)
        again = srv.log[before:]
        assert [r for p, r in again if p != big_url] == [], "finished files fetched again"
        ((_, resumed),) = [(p, r) for p, r in again if p == big_url]
        assert resumed is not None and int(resumed.removeprefix("bytes=").rstrip("-")) >= 2 * SLOW_PIECE, again
        assert (repo / "data/raw/openimages" / big).read_bytes() == tree[big]

        run(["dvc", "exp", "run", "-n", "coco", "-S", "data.dataset=coco", "download"], repo)
        after_coco = len(srv.log)
        run(["dvc", "exp", "run", "-n", "oi-back", "-S", "data.dataset=openimages", "download"], repo)
        assert [p for p, _ in srv.log[after_coco:] if p.startswith("/openimages/")] == []
    for path, body in tree.items():
        assert (repo / "data/raw/openimages" / path).read_bytes() == body
