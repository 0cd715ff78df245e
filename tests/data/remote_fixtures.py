"""A local HTTP server and small fixture files in the real formats of Open Images and COCO.

``FixtureServer`` is a threaded ``http.server`` on 127.0.0.1 serving bytes by URL path, with
``Range`` requests (206 / 416), an MD5 ``ETag`` (as S3 sends), a request log, and one-shot faults:
``drop_after[path] = n`` sends the full headers but closes the connection after n body bytes,
``corrupt_once`` flips a byte of the body once (same length, so only the checksum can tell);
``ranges = False`` makes it ignore ``Range`` (a whole 200 answer, as some servers do);
``delay[path] = s`` sends that body slowly, waiting ``s`` seconds before each ``SLOW_PIECE`` bytes
(a large file still in transfer when a test interrupts the download).

``openimages_files`` and ``coco_files`` build tiny datasets as the raw files of
``data/raw/<dataset>`` (CSV, JSONL, JSON, a zip, JPEGs made with Pillow), keyed by their path
there; ``serve_mirror`` puts them under ``/<dataset>/<path>``, the layout ``download.base_url``
expects.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import threading
import time
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

SLOW_PIECE = 16 * 1024


class FixtureServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; use as a context manager."""

    def __init__(self, files: dict[str, bytes] | None = None, etag: bool = True) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.etag = etag
        self.ranges = True  # False: ignore Range headers (send the whole file with 200)
        self.drop_after: dict[str, int] = {}
        self.corrupt_once: set[str] = set()
        self.delay: dict[str, float] = {}
        self.log: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                range_header = self.headers.get("Range")
                with server.lock:
                    server.log.append((path, range_header))
                    body = server.files.get(path)
                    drop = server.drop_after.pop(path, None)
                    corrupt = path in server.corrupt_once
                    delay = server.delay.get(path)
                    server.corrupt_once.discard(path)
                if body is None:
                    self.send_error(404, "not here")
                    return
                start = 0
                if range_header and server.ranges:
                    match = re.fullmatch(r"bytes=(\d+)-", range_header)
                    start = int(match.group(1)) if match else 0
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                payload = body[start:]
                if corrupt and payload:
                    payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(payload)))
                if server.etag:
                    self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                self.end_headers()
                if drop is not None:
                    self.wfile.write(payload[:drop])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if delay is not None:
                    for i in range(0, len(payload), SLOW_PIECE):
                        time.sleep(delay)
                        self.wfile.write(payload[i:i + SLOW_PIECE])
                        self.wfile.flush()
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def requests(self, path: str) -> list[str | None]:
        """The Range header of every request for ``path`` so far (None = no range)."""
        with self.lock:
            return [r for p, r in self.log if p == path]

    def __enter__(self) -> FixtureServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``condition`` every 50 ms; AssertionError naming ``what`` after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def serve_mirror(trees: dict[str, dict[str, bytes]], etag: bool = True) -> FixtureServer:
    """A server holding each dataset's files under ``/<dataset>/<path>`` (a mirror of data/raw)."""
    return FixtureServer({f"/{ds}/{path}": body for ds, tree in trees.items() for path, body in tree.items()}, etag)


def noise_jpeg(nbytes: int, seed: int = 0) -> bytes:
    """A JPEG of random pixels of at least ``nbytes`` bytes (noise barely compresses: about 1.2
    bytes per pixel at quality 95)."""
    import numpy as np

    side = int(nbytes**0.5) + 1
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small JPEG whose colours depend on ``seed`` (a gradient, so images differ)."""
    img = Image.new("RGB", size)
    img.putdata([((seed * 37 + x * 5) % 256, (seed * 91 + y * 7) % 256, (seed * 53 + x * y) % 256)
                 for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _csv_bytes(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


# Open Images fixture: a hierarchy with a label in two places (Teddy bear: under Toy at depth 2
# and under Mammal at depth 3, so it belongs under Mammal), a Part-only label (Wheel) and the
# root Entity listed among the classes, as in the real files.
OI_HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {"LabelName": "/m/toy", "Subcategory": [{"LabelName": "/m/teddy"}]},
        {
            "LabelName": "/m/animal",
            "Subcategory": [
                {"LabelName": "/m/mammal",
                 "Subcategory": [{"LabelName": "/m/cat"}, {"LabelName": "/m/dog"}, {"LabelName": "/m/teddy"}]},
                {"LabelName": "/m/bird"},
            ],
        },
        {"LabelName": "/m/vehicle", "Subcategory": [{"LabelName": "/m/car"}], "Part": [{"LabelName": "/m/wheel"}]},
    ],
}
OI_CLASSES = {
    "/m/0bl9f": "Entity", "/m/toy": "Toy", "/m/teddy": "Teddy bear", "/m/animal": "Animal",
    "/m/mammal": "Mammal", "/m/cat": "Cat", "/m/dog": "Dog", "/m/bird": "Bird", "/m/vehicle": "Vehicle",
    "/m/car": "Car", "/m/wheel": "Wheel",
}
OI_LEAVES = ["/m/cat", "/m/dog", "/m/teddy", "/m/bird", "/m/car", "/m/wheel"]
OI_SPLIT_SIZES = {"train": 12, "validation": 3, "test": 6}


def oi_image_id(split: str, i: int) -> str:
    return hashlib.sha256(f"{split}{i}".encode()).hexdigest()[:16]


def openimages_files(sizes: dict[str, int] | None = None, label_header: bool = True) -> dict[str, bytes]:
    """The raw files of a tiny Open Images: per split ``sizes[split]`` images; the second image of
    every split has two narratives; image i carries the leaf ``OI_LEAVES[i % 6]`` (Confidence 1)
    and a Confidence 0 row for Car; the last image of a split has no label at all."""
    from sparc.data import openimages as oi

    sizes = sizes or OI_SPLIT_SIZES
    files: dict[str, bytes] = {
        oi.HIERARCHY_PATH: json.dumps(OI_HIERARCHY).encode(),
        oi.CLASSES_PATH: _csv_bytes(([["LabelName", "DisplayName"]] if label_header else [])
                                    + [[k, v] for k, v in OI_CLASSES.items()]),
    }
    for split, n in sizes.items():
        lines, rows = [], [["ImageID", "Source", "LabelName", "Confidence"]]
        for i in range(n):
            image_id = oi_image_id(split, i)
            leaf = OI_LEAVES[i % len(OI_LEAVES)]
            noun = OI_CLASSES[leaf].lower()
            for k in range(2 if i == 1 else 1):
                lines.append(json.dumps({"dataset_id": f"open_images_{split}", "image_id": image_id,
                                         "annotator_id": 90 + k,
                                         "caption": f"In this image we can see a {noun} number {i}, take {k}. "}))
            if i < n - 1:
                rows += [[image_id, "verification", leaf, "1"], [image_id, "verification", "/m/car", "0"]]
            files[oi.image_path(split, image_id)] = jpeg_bytes(int(image_id[:6], 16) % 1000)
        files[oi.narratives_path(split)] = ("\n".join(lines) + "\n").encode()
        files[oi.labels_path(split)] = _csv_bytes(rows)
    return files


COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]
COCO_SPLIT_SIZES = {"train2017": 10, "val2017": 5}


def coco_image_id(split: str, i: int) -> int:
    return (1000 if split == "train2017" else 500) + 7 * i


def coco_annotations(split: str, n: int) -> tuple[dict, dict]:
    """(captions, instances) JSON of ``n`` images: image i has 5 captions (the last image none,
    so it is left out), a polygon instance of category i % 4, and image 0 also a crowd (RLE) dog."""
    images, caps, insts = [], [], []
    for i in range(n):
        image_id = coco_image_id(split, i)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 40, "height": 32,
                       "coco_url": f"http://images.cocodataset.org/{split}/{image_id:012d}.jpg"})
        if i < n - 1:
            caps += [{"id": image_id * 10 + c, "image_id": image_id, "caption": f" A {split} photo {i}, caption {c}.\n"}
                     for c in range(5)]
        cat = COCO_CATEGORIES[i % len(COCO_CATEGORIES)]
        insts.append({"id": image_id * 10, "image_id": image_id, "category_id": cat["id"], "iscrowd": 0,
                      "segmentation": [[4, 4, 20, 4, 20, 16, 4, 16]], "area": 192.0, "bbox": [4, 4, 16, 12]})
        if i == 0:
            insts.append({"id": image_id * 10 + 1, "image_id": image_id, "category_id": 18, "iscrowd": 1,
                          "segmentation": {"counts": [32 * 30, 64, 32 * 40 - 32 * 30 - 64], "size": [32, 40]},
                          "area": 64.0, "bbox": [30, 0, 2, 32]})
    images.reverse()  # file order is not id order
    info = {"description": "sparc fixture"}
    return ({"info": info, "images": images, "annotations": caps},
            {"info": info, "images": images, "annotations": insts, "categories": COCO_CATEGORIES})


def coco_files(sizes: dict[str, int] | None = None) -> dict[str, bytes]:
    """The raw files of a tiny COCO 2017: the annotations zip and the images."""
    from sparc.data import coco

    sizes = sizes or COCO_SPLIT_SIZES
    files: dict[str, bytes] = {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for split, n in sizes.items():
            captions, instances = coco_annotations(split, n)
            zf.writestr(coco.captions_path(split), json.dumps(captions))
            zf.writestr(coco.instances_path(split), json.dumps(instances))
            for img in captions["images"]:
                files[coco.image_path(split, img["file_name"])] = jpeg_bytes(img["id"] % 1000)
    files[coco.ANNOTATIONS_ZIP] = buf.getvalue()
    return files
