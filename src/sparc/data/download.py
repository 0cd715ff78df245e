"""The `download` stage: raw dataset files over HTTP, resumable, parallel, verified, with progress.

Every downloadable dataset (``DOWNLOADS`` in :mod:`sparc.data`) lists its files as
:class:`RemoteFile` s (a path inside ``data/raw/<dataset>/`` and the real URL) and fetches them
with :func:`download_files` into that directory, which is the stage's DVC output.

* **Download cache**: files are fetched into a cache directory outside the output
  (``data/raw/<dataset>.cache/`` by default, ``<download.cache>/<dataset>/`` when set) and linked
  into the output (a hard link, or a copy across file systems). DVC deletes a stage's outputs
  before running it and ``dvc exp run`` restores the workspace, so the output cannot hold partial
  or finished downloads across runs; the cache keeps both, also across a change of
  ``data.dataset``.
* **Resumable**: bytes arrive in ``<cache>/<path>.part``; an interrupted transfer (a dropped
  connection, a killed process) continues from the bytes already there with an HTTP ``Range``
  request (a server that ignores the range sends the whole file again, and the part is
  restarted).
* **Verified**: the size the server announced (``Content-Length``, or the total of
  ``Content-Range``), the MD5 the server publishes (``x-goog-hash: md5=...`` from Google Cloud
  Storage, ``Content-MD5``, or an S3-style ``ETag`` of 32 hex digits) when it publishes one, the
  digest of a checksum list (``download.checksums``: md5sum or sha256sum output) when it names
  the file, and the content (CSV and JSON parse, JSONL lines parse, JPEG decodes, zip CRCs match).
  A file that fails is deleted and fetched again (up to ``retries`` times). A server that
  publishes no MD5 (``python -m http.server``) and no checksum list leave only size and content:
  a same-size corruption inside a JPEG's image data decodes and passes.
* **Not fetched twice**: ``manifest.json`` (in the output: every file's size and MD5, sorted, so
  the same files give the same bytes) and ``<cache>/.state.jsonl`` (size, mtime, MD5 and SHA-256
  of every verified file in the cache, appended by the worker as each file finishes, so an
  interrupted run keeps its progress) say what is already there. A file whose size and mtime
  match its state entry is taken as verified; one that changed is hashed again and fetched again
  when its MD5 differs. A verified file found only in the output (``dvc pull``) is linked into
  the cache.
* **Parallel**, with a tqdm progress bar on stderr: ``download.workers`` connections. Ctrl-C
  stops every worker after its current chunk (a partial file stays for the next run) and raises
  KeyboardInterrupt.
* **Mirrors**: ``download.base_url`` '' fetches from the real hosts; any other URL is a mirror of
  ``data/raw``: file ``<path>`` of dataset ``<d>`` is fetched from ``<base_url>/<d>/<path>``
  (``python -m http.server -d data/raw`` on a machine that has the data is such a mirror).

Files a dataset marks ``optional`` (single images) that the server answers with 403, 404 or 410
are listed under ``unavailable`` in the manifest instead of failing the stage; the dataset
builders leave their samples out and say so. Any other failure, after the retries, fails the
stage with the file, the URL and the reason; what was fetched is kept for the next run.

Longer than 500 lines because it is one resumable downloader whose parts (ranged requests,
retries, verification, the shared cache, parallel workers, progress, the manifest) share one
state and are only correct together.
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
import shutil
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

RAW_ROOT = Path("data") / "raw"
MANIFEST = "manifest.json"
PART_SUFFIX = ".part"
CACHE_SUFFIX = ".cache"
STATE = ".state.jsonl"
LINK_SUFFIX = ".link"
CHUNK = 1 << 16
RETRIES = 5
BACKOFF_S = 1.0  # first wait between tries; doubles each time, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
TIMEOUT_S = 60.0
UNAVAILABLE_STATUS = (403, 404, 410)
USER_AGENT = "sparc-download/1 (+https://dvc.org; python urllib)"
CONTENT_KINDS = ("csv", "json", "jsonl", "jpeg", "zip", "any")
# One line of md5sum/sha256sum output (``<hex>  <path>``, `` *<path>`` in binary mode) or of their
# ``--tag`` form (``MD5 (<path>) = <hex>``).
_SUM_LINE = re.compile(r"(?P<hex>[0-9a-fA-F]{32}|[0-9a-fA-F]{64}) [ *](?P<path>.+)")
_TAG_LINE = re.compile(r"(?P<algo>MD5|SHA256) \((?P<path>.+)\) = (?P<hex>[0-9a-fA-F]{32}|[0-9a-fA-F]{64})")


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
    """A verified file: its size in bytes and the hex MD5 of its content (what the manifest
    keeps), and its hex SHA-256 ('' where only the manifest vouches for it)."""

    size: int
    md5: str
    sha256: str = ""

    def agrees(self, expected: tuple[str, str] | None) -> bool:
        """Whether the record matches ``expected`` = (``md5`` | ``sha256``, hex) of a checksum
        list (True when the list does not name the file)."""
        if expected is None:
            return True
        algo, digest = expected
        return (self.md5 if algo == "md5" else self.sha256) == digest


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


def cache_dir(raw: Path, root: str | Path = "") -> Path:
    """The download cache of output ``raw`` (module docstring): ``<raw>.cache`` beside it when
    ``root`` is '' (``data/raw/openimages.cache``), else ``<root>/<raw.name>`` (``~`` expanded)."""
    raw = Path(raw)
    if not str(root):
        return raw.with_name(raw.name + CACHE_SUFFIX)
    return Path(root).expanduser() / raw.name


def state_path(cache: Path) -> Path:
    """The verification journal of download cache ``cache``: ``<cache>/.state.jsonl``."""
    return Path(cache) / STATE


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(path: Path) -> tuple[str, str]:
    """(MD5, SHA-256) of ``path`` in hex, from one read."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def read_checksums(path: str | Path) -> dict[str, tuple[str, str]]:
    """A checksum list (``download.checksums``): path inside ``data/raw/<dataset>/`` -> (``md5`` |
    ``sha256``, lower-case hex), from md5sum or sha256sum output (``<hex>  <path>``, ``<hex>
    *<path>``, or the ``--tag`` form ``SHA256 (<path>) = <hex>``; a leading ``./`` is dropped;
    blank lines and ``#`` comments are skipped). ValueError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"download.checksums: {path} not found (give an md5sum or sha256sum file, or '')")
    sums: dict[str, tuple[str, str]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SUM_LINE.fullmatch(line) or _TAG_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"download.checksums: {path} line {lineno} is not '<md5 or sha256 hex>  <path>': {line[:80]!r}")
        digest = match.group("hex").lower()
        algo = "md5" if len(digest) == 32 else "sha256"
        if "algo" in match.groupdict() and match.group("algo").lower() != algo:
            raise ValueError(f"download.checksums: {path} line {lineno}: a {match.group('algo')} of {len(digest)} hex digits")
        rel = match.group("path").removeprefix("./")
        if rel in sums and sums[rel] != (algo, digest):
            raise ValueError(f"download.checksums: {path} line {lineno}: {rel} is listed twice with different digests")
        sums[rel] = (algo, digest)
    return sums


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
    expected: tuple[str, str] | None = None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> FileRecord:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a part left by an earlier try or
    run, and verify size, published MD5, the ``expected`` (algorithm, hex) digest of a checksum
    list and content (module docstring).

    Returns the verified record. Raises :class:`Unavailable` at once for 403/404/410, and
    :class:`DownloadError` after ``retries`` failed retries (connection errors, 5xx, short or
    corrupt bodies), keeping the part of an interrupted transfer for the next run. When ``stop``
    is set (Ctrl-C in :func:`download_files`) it returns within one chunk, raising
    :class:`Stopped` and keeping the part.
    """
    stop = stop or threading.Event()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    last = "no attempt"
    for attempt in range(retries + 1):
        if stop.wait(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S) if attempt else 0):
            raise Stopped(url)
        try:
            record = _fetch_once(url, part, kind=kind, expected=expected, timeout_s=timeout_s,
                                 on_bytes=on_bytes, stop=stop)
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


class Stopped(Exception):
    """A transfer stopped on request (Ctrl-C); its part is kept."""


class _Retry(Exception):
    """A transient failure: try again, keeping the part."""


class _Corrupt(Exception):
    """The complete body is not the file: delete the part and try again."""


def _fetch_once(
    url: str,
    part: Path,
    *,
    kind: str,
    expected: tuple[str, str] | None,
    timeout_s: float,
    on_bytes: Callable[[int], None] | None,
    stop: threading.Event,
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
                return _verify_part(part, total, published_md5(err.headers, 416), kind, expected)
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
                if stop.is_set():
                    raise Stopped(url)
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
    return _verify_part(part, total, md5, kind, expected)


def _verify_part(part: Path, total: int | None, md5: str | None, kind: str,
                 expected: tuple[str, str] | None) -> FileRecord:
    """Check a complete part against the announced size, the published MD5, the checksum
    list's ``expected`` digest and its content."""
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Corrupt(f"{size} bytes, the server announced {total}")
    record = FileRecord(size, *file_digests(part))
    if md5 is not None and record.md5 != md5:
        raise _Corrupt(f"MD5 {record.md5} differs from the server's {md5}")
    if not record.agrees(expected):
        algo, digest = expected
        raise _Corrupt(f"{algo.upper()} {getattr(record, algo)} differs from the checksum list's {digest}")
    try:
        check_content(part, kind)
    except ValueError as err:
        raise _Corrupt(f"bad content: {err}") from None
    return record


@dataclass(frozen=True)
class _Entry:
    """A state journal entry: the record of a file in the cache and its mtime when verified."""

    record: FileRecord
    mtime_ns: int


def _read_state(cache: Path) -> dict[str, _Entry]:
    """``path -> entry`` from the cache's state journal (last entry wins; a torn last line from a
    killed run, or an entry of an older format, is ignored)."""
    path = state_path(cache)
    state: dict[str, _Entry] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
                record = FileRecord(int(e["size"]), str(e["md5"]), str(e["sha256"]))
                state[e["path"]] = _Entry(record, int(e["mtime_ns"]))
            except (ValueError, KeyError, TypeError):
                continue
    return state


def _state_line(rel: str, entry: _Entry) -> str:
    r = entry.record
    return json.dumps({"path": rel, "size": r.size, "mtime_ns": entry.mtime_ns, "md5": r.md5, "sha256": r.sha256}) + "\n"


def _compact_state(cache: Path, state: dict[str, _Entry]) -> None:
    """Rewrite the journal with one line per file still in the cache (sorted)."""
    cache.mkdir(parents=True, exist_ok=True)
    with io.StringIO() as buf:
        for rel in sorted(state):
            if (cache / rel).is_file():
                buf.write(_state_line(rel, state[rel]))
        tmp = state_path(cache).with_suffix(".tmp")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, state_path(cache))


def _read_manifest(raw: Path) -> dict[str, FileRecord]:
    path = raw / MANIFEST
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
        return {p: FileRecord(int(r["size"]), str(r["md5"])) for p, r in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _known_good(path: Path, rel: str, state: dict[str, _Entry], manifest: dict[str, FileRecord]) -> FileRecord | None:
    """The record of ``path`` (the cached or the output copy of ``rel``) when it is present and
    verified (module docstring), else None."""
    if not path.is_file():
        return None
    st = path.stat()
    entry = state.get(rel)
    if entry is not None and entry.record.size == st.st_size and entry.mtime_ns == st.st_mtime_ns:
        return entry.record
    expected = manifest.get(rel) or (entry.record if entry is not None else None)
    if expected is None or expected.size != st.st_size:
        return None
    record = FileRecord(st.st_size, *file_digests(path))
    return record if record.md5 == expected.md5 else None


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``b`` is ``a`` (a hard link) or a copy of it with the same size and mtime."""
    if not b.is_file():
        return False
    sa, sb = a.stat(), b.stat()
    return os.path.samestat(sa, sb) or (sa.st_size, sa.st_mtime_ns) == (sb.st_size, sb.st_mtime_ns)


def link_file(src: Path, dest: Path) -> None:
    """Make ``dest`` the file ``src``: a hard link (no second copy on disk), or a copy keeping
    the mtime (``shutil.copy2``) where hard links fail (another file system); through
    ``<dest>.link`` and a rename, so ``dest`` is never half written."""
    if _same_file(src, dest):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + LINK_SUFFIX)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def download_files(
    files: Iterable[RemoteFile],
    raw: Path,
    *,
    dataset: str,
    base_url: str = "",
    workers: int = 16,
    cache: Path | None = None,
    checksums: dict[str, tuple[str, str]] | None = None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
    desc: str = "",
    progress: bool = True,
) -> DownloadResult:
    """Make every file of ``files`` present and verified under ``raw`` (module docstring).

    Files are fetched by ``workers`` threads into ``cache`` (default :func:`cache_dir` of
    ``raw``), verified (also against ``checksums``: path -> (algorithm, hex), see
    :func:`read_checksums`) and linked into ``raw``; verified files in the cache or the output are
    not fetched. Returns the records of all of ``files`` that are there and the optional ones the
    server does not have; raises :class:`DownloadError` naming the first failures (everything
    fetched before is kept, and recorded in the cache's state journal, for the next run). On
    Ctrl-C the workers stop after their current chunk and KeyboardInterrupt is raised.
    """
    from tqdm import tqdm

    files = list(files)
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"download: {dup} is listed twice")
    cache = Path(cache) if cache is not None else cache_dir(raw)
    checksums = checksums or {}
    raw.mkdir(parents=True, exist_ok=True)
    state = _read_state(cache)
    _compact_state(cache, state)
    manifest = _read_manifest(raw)
    result = DownloadResult()
    errors: list[str] = []
    bar = tqdm(total=len(files), unit="file", desc=desc or f"{dataset} download", disable=not progress,
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    transferred = [0]
    stop = threading.Event()
    journal_lock = threading.Lock()

    def count(n: int) -> None:
        transferred[0] += n  # an approximate total across threads: only shown, never checked

    def ensure(f: RemoteFile, journal: TextIO) -> tuple[FileRecord, bool]:
        """Verify or fetch ``f`` in the cache, journal it, link it into ``raw``; (record, fetched)."""
        if stop.is_set():
            raise Stopped(f.path)
        cached, dest = cache / f.path, raw / f.path
        expected = checksums.get(f.path)
        record = _known_good(cached, f.path, state, manifest)
        if record is None:
            record = _known_good(dest, f.path, state, manifest)
            if record is not None:  # in the output only (dvc pull, an earlier layout): keep it in the cache too
                link_file(dest, cached)
        fetched = record is None or not record.agrees(expected)
        if fetched:
            try:
                record = fetch_file(f.source(dataset, base_url), cached, kind=f.kind, expected=expected,
                                    retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                                    on_bytes=count, stop=stop)
            except Unavailable:
                cached.unlink(missing_ok=True)
                dest.unlink(missing_ok=True)
                raise
        entry = _Entry(record, cached.stat().st_mtime_ns)
        if state.get(f.path) != entry:
            with journal_lock:
                journal.write(_state_line(f.path, entry))
                journal.flush()
        link_file(cached, dest)
        return record, fetched

    with state_path(cache).open("a", encoding="utf-8") as journal:
        pool = ThreadPoolExecutor(max(1, workers))
        try:
            futures = {pool.submit(ensure, f, journal): f for f in files}
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
                bar.update(1)
                bar.set_postfix_str(f"{transferred[0] / 2**20:.1f} MiB fetched", refresh=False)
        except BaseException:
            stop.set()  # Ctrl-C (or a bug): the workers stop after their current chunk
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # the journal stays open for their last entries
            bar.close()
    result.bytes_transferred = transferred[0]
    result.fetched.sort()
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DownloadError(f"{dataset}: {len(errors)} file(s) failed: " + "; ".join(sorted(errors)[:3]) + more)
    return result


def write_manifest(raw: Path, dataset: str, result: DownloadResult, info: dict | None = None) -> Path:
    """Write ``manifest.json`` (sorted: the same files give the same bytes; the records of an
    earlier manifest whose files are still there are kept), delete stray ``.part`` and ``.link``
    files from the output (an older layout, a killed link), and return its path."""
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
    for stray in [p for p in raw.rglob("*") if p.suffix in (PART_SUFFIX, LINK_SUFFIX) and p.is_file()]:
        stray.unlink()
    return raw / MANIFEST


def read_manifest(raw: Path) -> dict:
    """``manifest.json`` of a download; FileNotFoundError naming the stage to run otherwise."""
    path = Path(raw) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the download stage first (dvc repro download)")
    return json.loads(path.read_text(encoding="utf-8"))


def run_download(dataset: str, base_url: str = "", workers: int = 16, options: object = None,
                 raw: Path | None = None, cache: str = "", checksums: str = "", **kwargs) -> Path:
    """The `download` stage for ``dataset``: its downloader (``DOWNLOADS`` in sparc.data) fills
    ``data/raw/<dataset>`` through the download cache under ``cache`` ('' = beside the output,
    :func:`cache_dir`), verifying against the checksum list at path ``checksums`` ('' = none);
    datasets with nothing to download get a manifest with no files."""
    from sparc.data import get_downloader

    raw = Path(raw) if raw is not None else raw_dir(dataset)
    downloader = get_downloader(dataset)
    if downloader is None:
        raw.mkdir(parents=True, exist_ok=True)
        return write_manifest(raw, dataset, DownloadResult(), {"note": f"{dataset}: nothing to download"})
    sums = read_checksums(checksums) if checksums else None
    return downloader(options, raw, base_url=base_url, workers=workers, cache=cache_dir(raw, cache),
                      checksums=sums, **kwargs)
