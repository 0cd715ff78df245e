"""`python:package.module:Class` streams: the README's example extractor, run through the extract
stage, and the errors for classes that do not fit the interface."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from sparc.catalog import check_spec
from sparc.features.base import open_rgb
from sparc.features.extract import extract_stream
from sparc.features.registry import build_extractor
from sparc.features.store import open_stream

ROOT = Path(__file__).resolve().parents[2]

# The example of docs/models.md ("Your own extractor"), saved as my_extractors.py by the tests below.
README_EXAMPLE = '''\
import numpy as np
import torch

from sparc.features.base import Extractor


class ColourMeans(Extractor):
    """Mean R, G, B over a size x size grid of cells: 3 * size**2 features per image."""

    inputs = ("image",)                          # what it reads: image and/or caption

    def __init__(self, spec, input, device="cpu"):
        super().__init__(spec, input, device)
        self.size = int(dict(spec.options).get("size", 4))   # python:...:ColourMeans?size=4
        self.dim = 3 * self.size**2
        self.model = torch.nn.AdaptiveAvgPool2d(self.size)  # not sent to the loading workers

    def preprocess_image(self, image):           # PIL RGB image -> [3, 64, 64] in [0, 1]
        pixels = np.asarray(image.resize((64, 64)), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def embed(self, batch):                      # [B, 3, 64, 64] -> [B, dim] float32
        return self.model(batch.to(self.device)).flatten(1).float().cpu()

    def preprocessing(self):                     # recorded in the stream's meta.json
        return {"resize": 64, "grid": self.size}
'''

BROKEN = '''\
import torch
from sparc.features.base import Extractor

class NoInputs(Extractor):
    def embed(self, batch):
        return batch

class NotAnExtractor:
    inputs = ("image",)

class NoDim(Extractor):
    inputs = ("caption",)
    def embed(self, batch):
        return torch.zeros(len(batch), 1)
'''


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """``my_extractors.py`` (the README example) and ``broken_extractors.py`` importable from
    tmp_path; both forgotten by the import system afterwards."""
    (tmp_path / "my_extractors.py").write_text(README_EXAMPLE)
    (tmp_path / "broken_extractors.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_extractors", "broken_extractors"):
        sys.modules.pop(name, None)


def test_readme_shows_the_example():
    assert f"```python\n# my_extractors.py\n{README_EXAMPLE}```" in (ROOT / "docs" / "models.md").read_text()


def test_readme_example_through_the_extract_stage(module_dir, prepared, tmp_path):
    """The README example extracts a stream (a worker process loads the images) whose rows are the
    colour means of the images computed directly, with its options and metadata."""
    spec = "python:my_extractors:ColourMeans?size=4"
    assert check_spec(spec, "image").options == (("size", "4"),)
    ex = build_extractor(spec, "image", "cpu")
    assert ex.dim == 48
    out = extract_stream(prepared, ex, tmp_path / "colours", batch_size=3, num_workers=1, progress=False)
    stream = open_stream(out)
    expected = []
    for path in prepared.images:
        pixels = np.asarray(open_rgb(path).resize((64, 64)), dtype=np.float32) / 255
        cells = pixels.reshape(4, 16, 4, 16, 3).mean(axis=(1, 3))  # [4, 4, 3]
        expected.append(cells.transpose(2, 0, 1).reshape(-1))
    np.testing.assert_allclose(np.asarray(stream.features, dtype=np.float32), np.stack(expected), atol=1e-3)
    assert stream.meta["model"] == spec and stream.meta["preprocessing"] == {"resize": 64, "grid": 4}
    assert "counts" not in stream.meta


@pytest.mark.parametrize(
    "spec, input, message",
    [
        ("python:my_extractors:ColourMeans", "caption", "reads image, not 'caption'"),
        ("python:my_extractors:Nope", "image", "module 'my_extractors' has no 'Nope'"),
        ("python:no_such_module_here:X", "image", "cannot import 'no_such_module_here'"),
        ("python:broken_extractors:NoInputs", "image", "class attribute inputs"),
        ("python:broken_extractors:NotAnExtractor", "image", "not a subclass of sparc.features.base.Extractor"),
        ("python:broken_extractors:NoDim", "caption", "must set self.dim to a positive int"),
    ],
)
def test_build_errors_name_the_problem(module_dir, spec, input, message):
    check_spec(spec, input)  # the form is fine: these are found only when the class is built
    with pytest.raises(ValueError, match=message):
        build_extractor(spec, input, "cpu")
