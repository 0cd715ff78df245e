"""Downloads against a local HTTP server: resume, checksums, corrupt files, unavailable files,
no second fetch of verified files, a deterministic manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from email.message import Message
from pathlib import Path

import pytest

from sparc.data.download import (
    DownloadError,
    RemoteFile,
    Unavailable,
    cache_dir,
    download_files,
    fetch_file,
    published_md5,
    read_checksums,
    run_download,
    state_path,
    write_manifest,
)
from tests.data.remote_fixtures import SLOW_PIECE, FixtureServer, jpeg_bytes, oi_image_id, wait_for

FAST = {"retries": 2, "backoff_s": 0.0, "timeout_s": 10.0}
BODY = bytes(range(256)) * 400  # 100 KiB
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def server():
    with FixtureServer({"/big.bin": BODY, "/a.jpg": jpeg_bytes(1), "/b.jpg": jpeg_bytes(2),
                        "/c.jpg": jpeg_bytes(3), "/not.jpg": b"no image here"}) as srv:
        yield srv


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path: Path) -> None:
    server.drop_after["/big.bin"] = 30_000
    record = fetch_file(f"{server.url}/big.bin", tmp_path / "big.bin", **FAST)
    assert (tmp_path / "big.bin").read_bytes() == BODY
    assert record.size == len(BODY) and record.md5 == hashlib.md5(BODY).hexdigest()
    assert server.requests("/big.bin") == [None, "bytes=30000-"]
    assert not (tmp_path / "big.bin.part").exists()


def test_part_left_by_a_killed_run_is_resumed(server, tmp_path: Path) -> None:
    (tmp_path / "big.bin.part").write_bytes(BODY[:12_345])
    fetch_file(f"{server.url}/big.bin", tmp_path / "big.bin", **FAST)
    assert (tmp_path / "big.bin").read_bytes() == BODY
    assert server.requests("/big.bin") == ["bytes=12345-"]


def test_complete_part_is_verified_without_fetching_again(server, tmp_path: Path) -> None:
    """A part that already holds the whole file: the server answers 416 with the file size."""
    (tmp_path / "big.bin.part").write_bytes(BODY)
    fetch_file(f"{server.url}/big.bin", tmp_path / "big.bin", **FAST)
    assert (tmp_path / "big.bin").read_bytes() == BODY
    assert server.requests("/big.bin") == [f"bytes={len(BODY)}-"]


def test_server_ignoring_the_range_restarts_the_file(server, tmp_path: Path) -> None:
    server.ranges = False
    (tmp_path / "big.bin.part").write_bytes(b"stale bytes of another file")
    fetch_file(f"{server.url}/big.bin", tmp_path / "big.bin", **FAST)
    assert (tmp_path / "big.bin").read_bytes() == BODY


def test_corrupt_body_is_detected_by_the_checksum_and_fetched_again(server, tmp_path: Path) -> None:
    server.corrupt_once.add("/big.bin")
    fetch_file(f"{server.url}/big.bin", tmp_path / "big.bin", **FAST)
    assert (tmp_path / "big.bin").read_bytes() == BODY
    assert server.requests("/big.bin") == [None, None]


def test_bad_content_without_a_checksum_fails_after_the_retries(server, tmp_path: Path) -> None:
    server.etag = False
    with pytest.raises(DownloadError, match=r"not.jpg: failed after 3 tries \(bad content"):
        fetch_file(f"{server.url}/not.jpg", tmp_path / "not.jpg", kind="jpeg", **FAST)
    assert not (tmp_path / "not.jpg").exists() and not (tmp_path / "not.jpg.part").exists()
    assert len(server.requests("/not.jpg")) == 3


def test_missing_file_is_unavailable_at_once(server, tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="HTTP 404"):
        fetch_file(f"{server.url}/gone.jpg", tmp_path / "gone.jpg", **FAST)
    assert len(server.requests("/gone.jpg")) == 1


def test_published_md5_from_gcs_s3_and_content_md5() -> None:
    digest = hashlib.md5(b"x").digest()
    import base64

    gcs = Message()
    gcs["x-goog-hash"] = f"crc32c=AAAAAA==,md5={base64.b64encode(digest).decode()}"
    assert published_md5(gcs, 206) == digest.hex()
    s3 = Message()
    s3["ETag"] = f'"{digest.hex()}"'
    assert published_md5(s3, 200) == digest.hex()
    s3_multipart = Message()
    s3_multipart["ETag"] = '"0123456789abcdef0123456789abcdef-12"'
    assert published_md5(s3_multipart, 200) is None
    kms = Message()
    kms["ETag"] = f'"{digest.hex()}"'
    kms["x-amz-server-side-encryption"] = "aws:kms"
    assert published_md5(kms, 200) is None
    weak = Message()
    weak["ETag"] = f'W/"{digest.hex()}"'
    assert published_md5(weak, 200) is None
    cmd5 = Message()
    cmd5["Content-MD5"] = base64.b64encode(digest).decode()
    assert published_md5(cmd5, 200) == digest.hex() and published_md5(cmd5, 206) is None


def files(names=("a", "b", "c")) -> list[RemoteFile]:
    return [RemoteFile(f"img/{n}.jpg", f"https://real.example/{n}.jpg", "jpeg", optional=True) for n in names]


def mirror(server: FixtureServer) -> FixtureServer:
    """Serve the server's /x.jpg also at /ds/img/x.jpg (the mirror layout of dataset 'ds')."""
    for n in ("a", "b", "c"):
        server.files[f"/ds/img/{n}.jpg"] = server.files[f"/{n}.jpg"]
    return server


def test_verified_files_are_not_fetched_again(server, tmp_path: Path) -> None:
    mirror(server)
    raw = tmp_path / "ds"
    first = download_files(files(), raw, dataset="ds", base_url=server.url, workers=3, **FAST)
    assert first.fetched == ["img/a.jpg", "img/b.jpg", "img/c.jpg"]
    write_manifest(raw, "ds", first)
    n_requests = len(server.log)
    second = download_files(files(), raw, dataset="ds", base_url=server.url, workers=3, **FAST)
    assert second.fetched == [] and len(server.log) == n_requests
    assert second.records == first.records
    # Without the state file, or without the whole download cache (another checkout of the same
    # output, `dvc pull`), the manifest still vouches.
    state_path(cache_dir(raw)).unlink()
    third = download_files(files(), raw, dataset="ds", base_url=server.url, workers=3, **FAST)
    assert third.fetched == [] and len(server.log) == n_requests
    shutil.rmtree(cache_dir(raw))
    fourth = download_files(files(), raw, dataset="ds", base_url=server.url, workers=3, **FAST)
    assert fourth.fetched == [] and len(server.log) == n_requests
    assert (cache_dir(raw) / "img/a.jpg").read_bytes() == server.files["/a.jpg"]  # back in the cache


def test_corrupt_local_file_is_fetched_again(server, tmp_path: Path) -> None:
    mirror(server)
    raw = tmp_path / "ds"
    write_manifest(raw, "ds", download_files(files(), raw, dataset="ds", base_url=server.url, **FAST))
    bad = bytearray((raw / "img/b.jpg").read_bytes())
    bad[100] ^= 0xFF  # same size, other bytes
    (raw / "img/b.jpg").write_bytes(bytes(bad))
    again = download_files(files(), raw, dataset="ds", base_url=server.url, **FAST)
    assert again.fetched == ["img/b.jpg"]
    assert (raw / "img/b.jpg").read_bytes() == server.files["/b.jpg"]


def test_unavailable_optional_files_are_listed_others_fail(server, tmp_path: Path) -> None:
    mirror(server)
    raw = tmp_path / "ds"
    del server.files["/ds/img/c.jpg"]
    result = download_files(files(), raw, dataset="ds", base_url=server.url, **FAST)
    assert sorted(result.records) == ["img/a.jpg", "img/b.jpg"]
    assert result.unavailable == {"img/c.jpg": "HTTP 404 not here"}
    manifest = json.loads(write_manifest(raw, "ds", result).read_text())
    assert manifest["unavailable"] == {"img/c.jpg": "HTTP 404 not here"}
    required = [RemoteFile("img/c.jpg", "https://real.example/c.jpg", "jpeg")]
    with pytest.raises(DownloadError, match=r"ds: 1 file\(s\) failed: img/c.jpg: .*HTTP 404"):
        download_files(required, raw, dataset="ds", base_url=server.url, **FAST)


def test_manifest_is_sorted_and_deterministic(server, tmp_path: Path) -> None:
    mirror(server)
    raw = tmp_path / "ds"
    result = download_files(files(("c", "a", "b")), raw, dataset="ds", base_url=server.url, workers=3, **FAST)
    (raw / "img/d.jpg.part").write_bytes(b"left by an older version")
    (raw / "img/a.jpg.link").write_bytes(b"left by a killed link")
    first = write_manifest(raw, "ds", result, {"n": 3}).read_bytes()
    result2 = download_files(files(("b", "c", "a")), raw, dataset="ds", base_url=server.url, workers=1, **FAST)
    assert write_manifest(raw, "ds", result2, {"n": 3}).read_bytes() == first
    manifest = json.loads(first)
    assert list(manifest["files"]) == ["img/a.jpg", "img/b.jpg", "img/c.jpg"]
    assert manifest["files"]["img/a.jpg"]["md5"] == hashlib.md5(server.files["/a.jpg"]).hexdigest()
    assert not list(raw.rglob("*.part")) and not list(raw.rglob("*.link"))


def test_source_url_real_host_or_mirror() -> None:
    f = RemoteFile("test/0123.jpg", "https://open-images-dataset.s3.amazonaws.com/test/0123.jpg")
    assert f.source("openimages", "") == f.url
    assert f.source("openimages", "http://127.0.0.1:8000/raw/") == "http://127.0.0.1:8000/raw/openimages/test/0123.jpg"


def test_datasets_without_downloads_get_an_empty_manifest(tmp_path: Path) -> None:
    out = run_download("emoji", raw=tmp_path / "emoji")
    manifest = json.loads(out.read_text())
    assert manifest["files"] == {} and manifest["dataset"] == "emoji"


def test_download_stage_failure_is_one_error_line(server, tmp_path: Path, monkeypatch, capsys) -> None:
    """`python -m sparc download` against a mirror that lacks the files: exit 2, one `error:`
    line naming the dataset, the file and the HTTP status."""
    from ruamel.yaml import YAML

    from sparc.cli import main
    from sparc.params import read_yaml

    raw = read_yaml(Path(__file__).resolve().parents[2] / "params.yaml")
    raw["data"]["dataset"] = "openimages"
    raw["download"] = {"base_url": server.url, "workers": 2}
    with (tmp_path / "params.yaml").open("w") as fh:
        YAML().dump(raw, fh)
    monkeypatch.chdir(tmp_path)
    assert main(["download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: openimages: 8 file(s) failed: labels/test-annotations")
    assert "HTTP 404" in err[-1]


def test_malformed_published_md5_is_ignored() -> None:
    bad = Message()
    bad["x-goog-hash"] = "md5=not*base64"
    assert published_md5(bad, 200) is None
    short = Message()
    short["Content-MD5"] = "AAAA"
    assert published_md5(short, 200) is None


def test_output_deleted_before_a_run_is_linked_again_from_the_cache(server, tmp_path: Path) -> None:
    """DVC deletes a stage's outputs before running it, and `dvc exp run` restores the workspace:
    the download cache beside the output keeps the files, which come back as hard links."""
    mirror(server)
    raw = tmp_path / "data/raw/ds"
    download_files(files(), raw, dataset="ds", base_url=server.url, **FAST)
    n_requests = len(server.log)
    shutil.rmtree(raw)
    again = download_files(files(), raw, dataset="ds", base_url=server.url, **FAST)
    assert again.fetched == [] and len(server.log) == n_requests
    for n in ("a", "b", "c"):
        out, cached = raw / f"img/{n}.jpg", tmp_path / f"data/raw/ds.cache/img/{n}.jpg"
        assert out.read_bytes() == server.files[f"/{n}.jpg"]
        assert out.stat().st_ino == cached.stat().st_ino  # one copy on disk


def test_cache_dir_beside_the_output_or_under_a_root(tmp_path: Path) -> None:
    assert cache_dir(Path("data/raw/openimages")) == Path("data/raw/openimages.cache")
    assert cache_dir(Path("data/raw/coco"), tmp_path) == tmp_path / "coco"


def test_part_in_the_cache_resumes_after_the_output_is_deleted(server, tmp_path: Path) -> None:
    raw = tmp_path / "big"
    server.files["/ds/big.bin"] = BODY
    (cache_dir(raw)).mkdir(parents=True)
    (cache_dir(raw) / "big.bin.part").write_bytes(BODY[:40_000])
    got = download_files([RemoteFile("big.bin", "https://real.example/big.bin")], raw, dataset="ds",
                         base_url=server.url, **FAST)
    assert got.fetched == ["big.bin"] and (raw / "big.bin").read_bytes() == BODY
    assert server.requests("/ds/big.bin") == ["bytes=40000-"]


def _md5sum_file(path: Path, bodies: dict[str, bytes], algo: str = "md5") -> Path:
    path.write_text("".join(f"{hashlib.new(algo, b).hexdigest()}  ./{p}\n" for p, b in bodies.items()))
    return path


def test_read_checksums_md5sum_sha256sum_and_tag_forms(tmp_path: Path) -> None:
    md5, sha = hashlib.md5(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    sums = tmp_path / "SUMS"
    sums.write_text(f"# made with md5sum and sha256sum\n{md5}  ./img/a.jpg\n\n{sha.upper()} *img/b.jpg\n"
                    f"SHA256 (img/c.jpg) = {sha}\n")
    assert read_checksums(sums) == {"img/a.jpg": ("md5", md5), "img/b.jpg": ("sha256", sha), "img/c.jpg": ("sha256", sha)}
    sums.write_text(f"{md5}  img/a.jpg\n{md5[:-1]}  img/b.jpg\n")
    with pytest.raises(ValueError, match=r"download.checksums: .*SUMS line 2 is not '<md5 or sha256 hex>  <path>'"):
        read_checksums(sums)
    with pytest.raises(ValueError, match="not found"):
        read_checksums(tmp_path / "missing")


def test_same_size_corruption_in_a_jpeg_passes_without_a_checksum_and_fails_with_one(server, tmp_path: Path) -> None:
    """A mirror that publishes no MD5 (`python -m http.server`) serving a JPEG with flipped bytes
    in its image data: the size matches and it decodes, so only a checksum list can tell."""
    mirror(server)
    server.etag = False
    good = server.files["/ds/img/a.jpg"]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x55  # inside the entropy-coded data: same size, still decodes
    server.files["/ds/img/a.jpg"] = bytes(bad)
    raw = tmp_path / "ds"
    passed = download_files(files(("a",)), raw, dataset="ds", base_url=server.url, **FAST)
    assert passed.fetched == ["img/a.jpg"] and (raw / "img/a.jpg").read_bytes() == bytes(bad)  # the limitation
    sums = read_checksums(_md5sum_file(tmp_path / "SHA256SUMS", {"img/a.jpg": good}, "sha256"))
    with pytest.raises(DownloadError, match=r"img/a.jpg: .*failed after 3 tries \(SHA256 [0-9a-f]{64} differs "
                                            r"from the checksum list's"):
        download_files(files(("a",)), raw, dataset="ds", base_url=server.url, checksums=sums, **FAST)
    server.files["/ds/img/a.jpg"] = good  # the mirror repaired: the stored bad copy is replaced
    fixed = download_files(files(("a",)), raw, dataset="ds", base_url=server.url, checksums=sums, **FAST)
    assert fixed.fetched == ["img/a.jpg"] and (raw / "img/a.jpg").read_bytes() == good
    n_requests = len(server.log)
    md5s = read_checksums(_md5sum_file(tmp_path / "MD5SUMS", {"img/a.jpg": good}))
    again = download_files(files(("a",)), raw, dataset="ds", base_url=server.url, checksums=md5s, **FAST)
    assert again.fetched == [] and len(server.log) == n_requests


def test_checksums_param_is_a_local_path_and_its_file_is_checked(tmp_path: Path) -> None:
    from sparc.params import DownloadParams, ParamsError, check_download, load_params
    from sparc.preflight import preflight

    with pytest.raises(ParamsError, match=r"download.checksums: 'https://x/SUMS' is a URL; give a local path"):
        check_download(DownloadParams(checksums="https://x/SUMS"))
    with pytest.raises(ParamsError, match=r"download.cache: 's3://b/c' is a URL"):
        check_download(DownloadParams(cache="s3://b/c"))
    params_file = tmp_path / "params.yaml"
    params_file.write_text((ROOT / "params.yaml").read_text().replace("  checksums: ''", f"  checksums: {tmp_path}/SUMS"))
    (tmp_path / "SUMS").write_text("not a checksum line\n")
    with pytest.raises(ParamsError, match=r"download.checksums: .*SUMS line 1 is not"):
        preflight(load_params(params_file))


def openimages_params(path: Path, base_url: str) -> Path:
    """The repository's params.yaml set to download openimages from ``base_url`` with 4 workers."""
    from ruamel.yaml import YAML

    from sparc.params import read_yaml

    raw = read_yaml(ROOT / "params.yaml")
    raw["data"]["dataset"] = "openimages"
    raw["download"].update(base_url=base_url, workers=4)
    with path.open("w") as fh:
        YAML().dump(raw, fh)
    return path


def test_ctrl_c_stops_within_seconds_and_keeps_what_is_complete(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) while one large image trickles in: `python -m sparc download` ends within
    seconds with one `error:` line; the next run fetches no finished file again and resumes the
    large one with a Range request."""
    from sparc.data import openimages as oi
    from tests.data.remote_fixtures import noise_jpeg, openimages_files, serve_mirror

    tree = openimages_files()
    big = oi.image_path("train", oi_image_id("train", 0))
    tree[big] = noise_jpeg(1_000_000)
    with serve_mirror({"openimages": tree}) as srv:
        srv.delay[f"/openimages/{big}"] = 0.2  # about 15 s for the whole image
        openimages_params(tmp_path / "params.yaml", srv.url)
        proc = subprocess.Popen([sys.executable, "-m", "sparc", "download"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            others = [f"/openimages/{p}" for p in tree if p != big]
            wait_for(lambda: len(srv.requests(f"/openimages/{big}")) == 1
                     and all(srv.requests(p) for p in others), "every file requested")
            time.sleep(1.0)  # the small files finish; the large one has about 80 KiB of 1 MB
            proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            _, err = proc.communicate(timeout=30)
            took = time.monotonic() - start
        finally:
            proc.kill()
        assert took < 5.0, f"Ctrl-C took {took:.1f} s to stop the download"
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("error: openimages: interrupted"), err
        before = len(srv.log)
        srv.delay.clear()
        assert main_download(tmp_path) == 0
        again = srv.log[before:]
    assert [(p, r) for p, r in again if p != f"/openimages/{big}"] == []
    ((_, resumed),) = again
    assert resumed is not None and int(resumed.removeprefix("bytes=").rstrip("-")) >= 2 * SLOW_PIECE
    assert (tmp_path / "data/raw/openimages" / big).read_bytes() == tree[big]


def main_download(cwd: Path) -> int:
    """``python -m sparc download`` in ``cwd``; its exit status."""
    return subprocess.run([sys.executable, "-m", "sparc", "download"], cwd=cwd, capture_output=True).returncode
