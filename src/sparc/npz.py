"""Deterministic ``.npz`` files: the same arrays always give the same bytes.

``np.savez`` stamps the current time into every zip entry, so an output rewritten with identical
arrays gets a new hash (DVC then sees a changed output). :func:`save_npz` writes the entries with
a fixed date, in the order given, to a temporary file renamed over ``path`` once complete (an
interrupted write never leaves a truncated file behind). ``np.load`` reads the result as usual.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray], compress: bool = False) -> Path:
    """Write ``arrays`` (name -> array, no pickled objects) to ``path`` as an ``.npz``; entries
    deflated when ``compress`` (as ``np.savez_compressed``), else stored (as ``np.savez``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    try:
        with zipfile.ZipFile(tmp, "w", compression=method) as zf:
            for key, arr in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
                info.compress_type = method
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asarray(arr, order="C"), allow_pickle=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
