"""The GPU-to-laptop workflow against a real S3 API: a local moto server and DVC's S3 plugin.

One machine runs the pipeline and pushes (`dvc push --run-cache`); a fresh `git clone` pulls and
has nothing to recompute; an experiment run in one clone (`dvc exp push`) is pulled, shown and
applied in another without re-running it. The endpoint is committed in `.dvc/config` (as for
MinIO or Ceph), the credentials only in each clone's `.dvc/config.local`, and the DVC processes
see no other AWS credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sparc.params import read_yaml
from tests.e2e import command_env, copy_repo, ran_stages, run

pytestmark = pytest.mark.slow

BUCKET = "sparc-remote-test"
KEY_ID = "sparc-test-key-id"
SECRET = secrets.token_hex(16)  # made per run, so finding it in a commit means it was committed
UP_TO_DATE = "Data and pipelines are up to date"


def s3_client(endpoint: str):
    """A boto3 S3 client of the test server, with the test keys."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
    )


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, holding one empty bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3_client(url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of every command: no AWS credentials but those in `.dvc/config.local`."""
    home = tmp_path_factory.mktemp("aws")
    env = {k: v for k, v in command_env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(home / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        DVC_NO_ANALYTICS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `cmd` in `cwd` (fails the test when it fails); return its stdout."""
    return run(cmd, cwd, env).stdout


def git_clone(src: Path, dst: Path, env: dict[str, str]) -> Path:
    """`git clone src dst` with a local identity (experiments commit)."""
    sh(["git", "clone", "-q", str(src), str(dst)], dst.parent, env)
    sh(["git", "config", "user.name", "t"], dst, env)
    sh(["git", "config", "user.email", "t@t"], dst, env)
    return dst


def add_credentials(repo: Path, env: dict[str, str]) -> None:
    """The README's credential set-up: keys in the git-ignored `.dvc/config.local`."""
    sh(["dvc", "remote", "modify", "--local", "storage", "access_key_id", KEY_ID], repo, env)
    sh(["dvc", "remote", "modify", "--local", "storage", "secret_access_key", SECRET], repo, env)


def output_files(repo: Path) -> dict[str, tuple[str, int]]:
    """Every file of every output in `dvc.lock` -> (sha256, mtime in ns): what a push uploads."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    files: dict[str, tuple[str, int]] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            root = repo / out["path"]
            for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                files[path.relative_to(repo).as_posix()] = (digest, path.stat().st_mtime_ns)
    return files


def hashes(files: dict[str, tuple[str, int]]) -> dict[str, str]:
    """`output_files` without the mtimes."""
    return {rel: digest for rel, (digest, _) in files.items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory, pipeline_run, endpoint, env) -> dict[str, Path]:
    """The GPU machine: a copy of the session's pipeline run (tests/conftest.py) with the S3 remote
    committed, pushed to a bare git repository (`origin` of the clones) and, outputs and
    run-cache, to the bucket."""
    base = tmp_path_factory.mktemp("remote")
    work = copy_repo(pipeline_run, base / "gpu")
    sh(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/sparc"], work, env)
    sh(["dvc", "remote", "modify", "storage", "endpointurl", endpoint], work, env)
    add_credentials(work, env)
    sh(["git", "add", ".dvc/config", "dvc.lock"], work, env)
    sh(["git", "commit", "-qm", "lock and S3 remote"], work, env)
    origin = base / "origin.git"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], base, env)
    sh(["git", "push", "-q", str(origin), "main"], work, env)
    sh(["dvc", "push", "--run-cache"], work, env)
    return {"base": base, "work": work, "origin": origin}


@pytest.fixture(scope="module")
def laptop(published, env) -> Path:
    """A fresh clone of the bare repository with the credentials added and `dvc pull` done."""
    clone = git_clone(published["origin"], published["base"] / "laptop", env)
    add_credentials(clone, env)
    sh(["dvc", "pull"], clone, env)
    return clone


def bucket_keys(endpoint: str) -> list[str]:
    """Every object key in the test bucket."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_push_uploads_the_outputs_and_the_run_cache_not_the_secret(published, endpoint, env):
    keys = bucket_keys(endpoint)
    assert any(k.startswith("sparc/files/md5/") for k in keys), keys
    assert any(k.startswith("sparc/runs/") for k in keys), keys  # --run-cache
    work = published["work"]
    assert "Cache and remote 'storage' are in sync." in sh(["dvc", "status", "--cloud"], work, env)
    found = subprocess.run(["git", "grep", "-q", SECRET, "main"], cwd=work, env=env).returncode
    assert found == 1, "the secret key was committed"  # git grep: 1 = no match
    assert SECRET in (work / ".dvc/config.local").read_text()
    assert endpoint in (work / ".dvc/config").read_text()  # the endpoint is shared


def test_fresh_clone_pulls_everything_and_recomputes_nothing(published, laptop, env):
    pulled = output_files(laptop)
    assert hashes(pulled) == hashes(output_files(published["work"]))
    for prefix in ("data/features/", "data/sae/", "data/codes/", "reports/concepts/", "reports/headline.json"):
        assert any(rel.startswith(prefix) for rel in pulled), prefix  # features, SAE, codes, reports
    out = sh(["dvc", "repro"], laptop, env)
    assert UP_TO_DATE in out and not ran_stages(out), out
    assert output_files(laptop) == pulled  # same bytes, same mtimes: nothing was rewritten


def headline_of(show: list[dict], name: str) -> dict:
    """The `reports/headline.json` metrics of experiment `name` in `dvc exp show --json` output."""
    for commit in show:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                if rev["name"] == name:
                    return rev["data"]["metrics"]["reports/headline.json"]["data"]
    raise AssertionError(f"experiment {name} not in dvc exp show: {json.dumps(show)[:2000]}")


def test_experiment_pushed_from_one_clone_is_pulled_and_applied_in_another(published, laptop, env):
    out = sh(["dvc", "exp", "run", "-n", "seed1", "-S", "seed=1"], laptop, env)
    ran = ran_stages(out)
    assert "train" in ran and not any(s.split("@")[0] in ("download", "prepare", "extract") for s in ran), out
    trained = hashes(output_files(laptop))
    sae = sorted(rel for rel in trained if rel.startswith("data/sae/"))
    assert sae and any(trained[rel] != hashes(output_files(published["work"]))[rel] for rel in sae)
    sh(["dvc", "exp", "push", "origin", "seed1"], laptop, env)
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], published["origin"], env)
    assert refs.strip().endswith("/seed1"), refs

    other = git_clone(published["origin"], published["base"] / "desktop", env)
    add_credentials(other, env)
    sh(["dvc", "exp", "pull", "origin", "seed1"], other, env)
    show = json.loads(sh(["dvc", "exp", "show", "--json"], other, env))
    headline = json.loads((laptop / "reports/headline.json").read_text())
    assert headline_of(show, "seed1") == {k: v for k, v in headline.items() if v is not None}
    sh(["dvc", "exp", "apply", "seed1"], other, env)
    sh(["dvc", "pull"], other, env)
    assert read_yaml(other / "params.yaml")["seed"] == 1
    assert hashes(output_files(other)) == trained
    out = sh(["dvc", "repro"], other, env)
    assert UP_TO_DATE in out and not ran_stages(out), out

    # Back to seed 0, never computed here: `--pull` fetches the pushed run-cache and the outputs
    # it names, and every stage is restored instead of re-run.
    params = other / "params.yaml"
    text, replaced = re.subn(r"(?m)^seed: 1\b", "seed: 0", params.read_text(), count=1)
    assert replaced == 1, text
    params.write_text(text)
    out = sh(["dvc", "repro", "--pull"], other, env)
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out, out
    assert ran_stages(out) <= {"check"}, out  # `check` has no outputs, so no run-cache entry
    assert hashes(output_files(other)) == hashes(output_files(published["work"]))
