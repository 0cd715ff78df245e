"""Downloads against a local HTTP server: resume, checksums, corrupt files, unavailable files,
no second fetch of verified files, a deterministic manifest."""

from __future__ import annotations

import hashlib
import json
from email.message import Message
from pathlib import Path

import pytest

from sparc.data.download import (
    DownloadError,
    RemoteFile,
    Unavailable,
    download_files,
    fetch_file,
    published_md5,
    run_download,
    state_path,
    write_manifest,
)
from tests.data.remote_fixtures import FixtureServer, jpeg_bytes

FAST = {"retries": 2, "backoff_s": 0.0, "timeout_s": 10.0}
BODY = bytes(range(256)) * 400  # 100 KiB


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
    # Without the state file (another checkout of the same output) the manifest still vouches.
    state_path(raw).unlink()
    third = download_files(files(), raw, dataset="ds", base_url=server.url, workers=3, **FAST)
    assert third.fetched == [] and len(server.log) == n_requests


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
    first = write_manifest(raw, "ds", result, {"n": 3}).read_bytes()
    result2 = download_files(files(("b", "c", "a")), raw, dataset="ds", base_url=server.url, workers=1, **FAST)
    assert write_manifest(raw, "ds", result2, {"n": 3}).read_bytes() == first
    manifest = json.loads(first)
    assert list(manifest["files"]) == ["img/a.jpg", "img/b.jpg", "img/c.jpg"]
    assert manifest["files"]["img/a.jpg"]["md5"] == hashlib.md5(server.files["/a.jpg"]).hexdigest()
    assert not list(raw.rglob("*.part"))


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
