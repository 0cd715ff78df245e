"""The `download` stage: raw dataset files over HTTP, resumable, parallel, verified, with progress.

Every downloadable dataset (``DOWNLOADS`` in :mod:`sparc.data`) lists its files as
:class:`RemoteFile` s (a path inside ``data/raw/<dataset>/`` and the real URL) and fetches them
with :func:`download_files` into that directory, which is the stage's DVC output.

* **Resumable**: bytes arrive in ``<path>.part``; an interrupted transfer (a dropped connection,
  a killed process) continues from the bytes already there with an HTTP ``Range`` request
  (a server that ignores the range sends the whole file again, and the part is restarted).
* **Verified**: the size the server announced (``Content-Length``, or the total of
  ``Content-Range``), the MD5 the server publishes (``x-goog-hash: md5=...`` from Google Cloud
  Storage, ``Content-MD5``, or an S3-style ``ETag`` of 32 hex digits) when it publishes one, and
  the content (CSV and JSON parse, JSONL lines parse, JPEG decodes, zip CRCs match). A file that
  fails is deleted and fetched again (up to ``retries`` times).
* **Not fetched twice**: ``manifest.json`` (in the output: every file's size and MD5, sorted, so
  the same files give the same bytes) and ``data/raw/<dataset>.state.jsonl`` (outside it: size,
  mtime and MD5 of every verified file, appended as files finish, so an interrupted run keeps
  its progress) say what is already there. A file whose size and mtime match its state entry is
  taken as verified; one that changed is hashed again and fetched again when its MD5 differs.
* **Parallel**, with a tqdm progress bar on stderr: ``download.workers`` connections.
* **Mirrors**: ``download.base_url`` '' fetches from the real hosts; any other URL is a mirror of
  ``data/raw``: file ``<path>`` of dataset ``<d>`` is fetched from ``<base_url>/<d>/<path>``
  (``python -m http.server -d data/raw`` on a machine that has the data is such a mirror).

Files a dataset marks ``optional`` (single images) that the server answers with 403, 404 or 410
are listed under ``unavailable`` in the manifest instead of failing the stage; the dataset
builders leave their samples out and say so. Any other failure, after the retries, fails the
stage with the file, the URL and the reason; what was fetched is kept for the next run.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import http.client
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

RAW_ROOT = Path("data") / "raw"
MANIFEST = "manifest.json"
PART_SUFFIX = ".part"
CHUNK = 1 << 16
RETRIES = 5
BACKOFF_S = 1.0  # first wait between tries; doubles each time, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
TIMEOUT_S = 60.0
UNAVAILABLE_STATUS = (403, 404, 410)
USER_AGENT = "sparc-download/1 (+https://dvc.org; python urllib)"
CONTENT_KINDS = ("csv", "json", "jsonl", "jpeg", "zip", "any")


class DownloadError(RuntimeError):
    """A file could not be fetched and verified; the message names the file, URL and reason."""


class Unavailable(DownloadError):
    """The server says the file does not exist or may not be read (403, 404, 410)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: ``path`` inside ``data/raw/<dataset>/`` (POSIX, also its path on a
    mirror), ``url`` on the real host, the ``kind`` of content check, and whether a missing file
    (403/404/410) is tolerated (``optional``)."""

    path: str
    url: str
    kind: str = "any"
    optional: bool = False

    def source(self, dataset: str, base_url: str) -> str:
        """The URL to fetch: the real one, or ``<base_url>/<dataset>/<path>`` on a mirror."""
        if not base_url:
            return self.url
        return f"{base_url.rstrip('/')}/{dataset}/{self.path}"


@dataclass(frozen=True)
class FileRecord:
    """A verified file: its size in bytes and the hex MD5 of its content."""

    size: int
    md5: str


@dataclass
class DownloadResult:
    """What :func:`download_files` left in the raw directory: verified files by path, paths the
    server does not have (with the reason), and how many bytes this run transferred."""

    records: dict[str, FileRecord] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)
    bytes_transferred: int = 0


def raw_dir(dataset: str) -> Path:
    """Where `download` writes dataset ``dataset`` (the stage's output): ``data/raw/<dataset>``."""
    return RAW_ROOT / dataset


def state_path(raw: Path) -> Path:
    """The verification state of ``raw``: ``<raw>.state.jsonl`` beside it (not a DVC output)."""
    return raw.with_name(raw.name + ".state.jsonl")


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_content(path: Path, kind: str) -> None:
    """Raise ValueError when ``path`` is not a well-formed file of ``kind`` (module docstring)."""
    if kind == "any":
        return
    try:
        if kind == "jpeg":
            from PIL import Image

            with Image.open(path) as img:
                img.verify()
        elif kind == "json":
            json.loads(path.read_bytes())
        elif kind == "jsonl":
            with path.open("rb") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except ValueError as err:
                            raise ValueError(f"line {lineno}: {err}") from None
        elif kind == "csv":
            with path.open(encoding="utf-8", newline="") as fh:
                for _ in csv.reader(fh, strict=True):
                    pass
        elif kind == "zip":
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC")
        else:
            raise ValueError(f"unknown content kind {kind!r} (known: {', '.join(CONTENT_KINDS)})")
    except ValueError:
        raise
    except Exception as err:  # a decoder's own error type: the content is bad
        raise ValueError(f"not a valid {kind} file ({type(err).__name__}: {err})") from None


def published_md5(headers: http.client.HTTPMessage, status: int) -> str | None:
    """The hex MD5 of the whole file as the server publishes it, or None.

    ``x-goog-hash: crc32c=...,md5=<base64>`` (Google Cloud Storage, also on 206), ``Content-MD5``
    (base64; only on a 200, where it covers the whole body), or an ``ETag`` of 32 hex digits (S3
    objects uploaded in one part without KMS encryption: their ETag is the MD5).
    """
    for value in headers.get_all("x-goog-hash") or []:
        for item in value.split(","):
            key, _, b64 = item.strip().partition("=")
            if key == "md5" and b64:
                return _b64_md5(b64)
    if status == 200 and headers.get("Content-MD5"):
        return _b64_md5(headers["Content-MD5"])
    etag = (headers.get("ETag") or "").strip()
    if etag.startswith("W/"):
        return None
    etag = etag.strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{32}", etag) and headers.get("x-amz-server-side-encryption") != "aws:kms":
        return etag
    return None


def _b64_md5(value: str) -> str | None:
    """A base64 MD5 as hex; None when it is not 16 bytes of base64."""
    try:
        digest = base64.b64decode(value.strip() + "=" * (-len(value.strip()) % 4), validate=True)
    except ValueError:
        return None
    return digest.hex() if len(digest) == 16 else None


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); ``bytes */total`` -> (None, total); (None, None) otherwise."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if match is None:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def fetch_file(
    url: str,
    dest: Path,
    *,
    kind: str = "any",
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
    on_bytes: Callable[[int], None] | None = None,
) -> FileRecord:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a part left by an earlier try or
    run, and verify size, published MD5 and content (module docstring).

    Returns the verified record. Raises :class:`Unavailable` at once for 403/404/410, and
    :class:`DownloadError` after ``retries`` failed retries (connection errors, 5xx, short or
    corrupt bodies), keeping the part of an interrupted transfer for the next run.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    last = "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        try:
            record = _fetch_once(url, part, kind=kind, timeout_s=timeout_s, on_bytes=on_bytes)
        except Unavailable:
            part.unlink(missing_ok=True)
            raise
        except _Corrupt as err:
            part.unlink(missing_ok=True)  # start over: the bytes themselves are wrong
            last = str(err)
            continue
        except (OSError, http.client.HTTPException, _Retry) as err:
            last = f"{type(err).__name__}: {err}"
            continue
        os.replace(part, dest)
        return record
    raise DownloadError(f"{url}: failed after {retries + 1} tries ({last}); run again to resume")


class _Retry(Exception):
    """A transient failure: try again, keeping the part."""


class _Corrupt(Exception):
    """The complete body is not the file: delete the part and try again."""


def _fetch_once(
    url: str, part: Path, *, kind: str, timeout_s: float, on_bytes: Callable[[int], None] | None
) -> FileRecord:
    """One request: resume ``part`` from its size, append the body, then verify it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code in UNAVAILABLE_STATUS:
            raise Unavailable(f"{url}: HTTP {err.code} {err.reason}") from None
        if err.code == 416 and offset:
            # The part may already hold the whole file: the server says how long the file is.
            _, total = _content_range_total(err.headers.get("Content-Range"))
            if total == offset:
                return _verify_part(part, total, published_md5(err.headers, 416), kind)
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 for a part of {offset} bytes (file: {total} bytes)") from None
        if err.code >= 500 or err.code == 429:
            raise _Retry(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    with response:
        status = response.status
        md5 = published_md5(response.headers, status)
        if status == 206:
            start, total = _content_range_total(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, not {offset}")
            mode = "ab"
        elif status == 200:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            offset, mode = 0, "wb"  # no range asked, or the server ignored it: start over
        else:
            raise _Retry(f"unexpected HTTP status {status}")
        with part.open(mode) as fh:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except http.client.IncompleteRead as err:
                    fh.write(err.partial)
                    if on_bytes is not None:
                        on_bytes(len(err.partial))
                    raise _Retry(f"connection closed after {fh.tell()} bytes") from None
                except TimeoutError as err:
                    raise _Retry(f"timed out after {fh.tell()} bytes") from err
                if not chunk:
                    break
                fh.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retry(f"connection closed after {size} of {total} bytes")
    return _verify_part(part, total, md5, kind)


def _verify_part(part: Path, total: int | None, md5: str | None, kind: str) -> FileRecord:
    """Check a complete part against the announced size, the published MD5 and its content."""
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Corrupt(f"{size} bytes, the server announced {total}")
    digest = file_md5(part)
    if md5 is not None and digest != md5:
        raise _Corrupt(f"MD5 {digest} differs from the server's {md5}")
    try:
        check_content(part, kind)
    except ValueError as err:
        raise _Corrupt(f"bad content: {err}") from None
    return FileRecord(size, digest)


def _read_state(raw: Path) -> dict[str, tuple[int, int, str]]:
    """``path -> (size, mtime_ns, md5)`` from the state journal (last entry wins; a torn last
    line from a killed run is ignored)."""
    path = state_path(raw)
    state: dict[str, tuple[int, int, str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                state[entry["path"]] = (int(entry["size"]), int(entry["mtime_ns"]), str(entry["md5"]))
            except (ValueError, KeyError, TypeError):
                continue
    return state


def _read_manifest(raw: Path) -> dict[str, FileRecord]:
    path = raw / MANIFEST
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
        return {p: FileRecord(int(r["size"]), str(r["md5"])) for p, r in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _known_good(dest: Path, rel: str, state: dict, manifest: dict[str, FileRecord]) -> FileRecord | None:
    """The record of ``dest`` when it is present and verified (module docstring), else None."""
    if not dest.is_file():
        return None
    st = dest.stat()
    if rel in state:
        size, mtime_ns, md5 = state[rel]
        if size == st.st_size and mtime_ns == st.st_mtime_ns:
            return FileRecord(size, md5)
    expected = manifest.get(rel) or (FileRecord(state[rel][0], state[rel][2]) if rel in state else None)
    if expected is None or expected.size != st.st_size:
        return None
    return expected if file_md5(dest) == expected.md5 else None


def download_files(
    files: Iterable[RemoteFile],
    raw: Path,
    *,
    dataset: str,
    base_url: str = "",
    workers: int = 16,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
    desc: str = "",
    progress: bool = True,
) -> DownloadResult:
    """Make every file of ``files`` present and verified under ``raw`` (module docstring).

    Present, verified files are not fetched; the rest are fetched by ``workers`` threads.
    Returns the records of all of ``files`` that are there and the optional ones the server does
    not have; raises :class:`DownloadError` naming the first failures (everything fetched
    before is kept, and recorded in the state journal, for the next run).
    """
    from tqdm import tqdm

    files = list(files)
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"download: {dup} is listed twice")
    raw.mkdir(parents=True, exist_ok=True)
    state = _read_state(raw)
    manifest = _read_manifest(raw)
    result = DownloadResult()
    errors: list[str] = []
    bar = tqdm(total=len(files), unit="file", desc=desc or f"{dataset} download", disable=not progress,
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    transferred = [0]

    def count(n: int) -> None:
        transferred[0] += n  # an approximate total across threads: only shown, never checked

    def ensure(f: RemoteFile) -> tuple[FileRecord, bool]:
        dest = raw / f.path
        known = _known_good(dest, f.path, state, manifest)
        if known is not None:
            return known, False
        url = f.source(dataset, base_url)
        try:
            record = fetch_file(url, dest, kind=f.kind, retries=retries, backoff_s=backoff_s,
                                timeout_s=timeout_s, on_bytes=count)
        except Unavailable:
            dest.unlink(missing_ok=True)
            raise
        return record, True

    with state_path(raw).open("a", encoding="utf-8") as journal, ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(ensure, f): f for f in files}
        for future in as_completed(futures):
            f = futures[future]
            try:
                record, fetched = future.result()
            except Unavailable as err:
                if not f.optional:
                    errors.append(f"{f.path}: {err}")
                else:
                    result.unavailable[f.path] = str(err).rsplit(": ", 1)[-1]
            except DownloadError as err:
                errors.append(f"{f.path}: {err}")
            else:
                result.records[f.path] = record
                if fetched:
                    result.fetched.append(f.path)
                st = (raw / f.path).stat()
                journal.write(json.dumps({"path": f.path, "size": record.size, "mtime_ns": st.st_mtime_ns,
                                          "md5": record.md5}) + "\n")
                journal.flush()
            bar.update(1)
            bar.set_postfix_str(f"{transferred[0] / 2**20:.1f} MiB fetched", refresh=False)
    bar.close()
    result.bytes_transferred = transferred[0]
    result.fetched.sort()
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DownloadError(f"{dataset}: {len(errors)} file(s) failed: " + "; ".join(sorted(errors)[:3]) + more)
    return result


def write_manifest(raw: Path, dataset: str, result: DownloadResult, info: dict | None = None) -> Path:
    """Write ``manifest.json`` (sorted: the same files give the same bytes), compact the state
    journal to the files present, and delete stray ``.part`` files; returns the manifest path."""
    records = dict(_read_manifest(raw))
    records.update(result.records)
    records = {p: r for p, r in records.items() if (raw / p).is_file()}
    manifest = {
        "dataset": dataset,
        "info": info or {},
        "files": {p: {"size": r.size, "md5": r.md5} for p, r in sorted(records.items())},
        "unavailable": dict(sorted(result.unavailable.items())),
    }
    tmp = raw / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, raw / MANIFEST)
    state = _read_state(raw)
    with io.StringIO() as buf:
        for p in sorted(records):
            if p in state:
                size, mtime_ns, md5 = state[p]
                buf.write(json.dumps({"path": p, "size": size, "mtime_ns": mtime_ns, "md5": md5}) + "\n")
        state_tmp = state_path(raw).with_suffix(".tmp")
        state_tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(state_tmp, state_path(raw))
    for stray in raw.rglob(f"*{PART_SUFFIX}"):
        stray.unlink()
    return raw / MANIFEST


def read_manifest(raw: Path) -> dict:
    """``manifest.json`` of a download; FileNotFoundError naming the stage to run otherwise."""
    path = Path(raw) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the download stage first (dvc repro download)")
    return json.loads(path.read_text(encoding="utf-8"))


def run_download(dataset: str, base_url: str = "", workers: int = 16, options: object = None,
                 raw: Path | None = None, **kwargs) -> Path:
    """The `download` stage for ``dataset``: its downloader (``DOWNLOADS`` in sparc.data) fills
    ``data/raw/<dataset>``; datasets with nothing to download get a manifest with no files."""
    from sparc.data import get_downloader

    raw = Path(raw) if raw is not None else raw_dir(dataset)
    downloader = get_downloader(dataset)
    if downloader is None:
        raw.mkdir(parents=True, exist_ok=True)
        return write_manifest(raw, dataset, DownloadResult(), {"note": f"{dataset}: nothing to download"})
    return downloader(options, raw, base_url=base_url, workers=workers, **kwargs)
