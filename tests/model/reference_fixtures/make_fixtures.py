"""Make the reference-format fixtures of tests/model/test_reference.py and tests/test_reference_pipeline.py
with the SPARC reference code itself (AtlasAnalyticsLab/SPARC, commit 7f36faa).

    python tests/model/reference_fixtures/make_fixtures.py /path/to/SPARC [OUT_DIR]
    python tests/model/reference_fixtures/make_fixtures.py /path/to/SPARC --check EXPORTED RULE FIXTURES

``/path/to/SPARC`` is a checkout of the reference repository (e.g. ``git archive 7f36faa sparc``
of its mirror); its package is imported from there (its model classes, loss, utils and
``HDF5FeatureDataset``), never installed. Its ``sparc/__init__.py`` imports Triton kernels and
extraction code, so the script registers ``sparc`` and ``sparc.model`` as bare packages over the
checkout's folders and stubs ``sparc.kernels`` (only its Triton sparse decoder, unused with
``use_sparse_decoder=False``). Run it in an environment without this project's ``sparc`` on the
path (the two packages share the name): ``python -I`` or from another directory.

Written to OUT_DIR (default: this script's folder), all tiny:

* ``global/`` and ``local/``: ``msae_checkpoint.pth`` (``torch.save(model.state_dict())``) and
  ``run_config.json`` (``{"args": ..., "config_file_content": ...}`` as the reference's main.py)
  of the reference's ``MultiStreamSparseAutoencoder`` (model_global.py, model_local.py) with
  streams dino 16, clip_img 12, clip_txt 8, L 64, k 4, auxk 8, after 5 Adam steps of the
  reference's own training step (compute_loss, decoder gradient projection, renormalisation);
* ``outputs.npz``: inputs and the reference model's forward outputs on them, per rule
  (``<rule>/x/<s>`` the unit-norm inputs as HDF5FeatureDataset yields them, ``<rule>/codes/<s>``
  the dense ``sparse_codes_<s>`` [B, L], ``<rule>/indices/<s>`` the selected latents [B, k]
  (``shared_indices``, or Local TopK's ``indices_<s>``), ``<rule>/recon/<t>/<s>`` the decoding of stream s's code
  by stream t's decoder, self included);
* ``features/<split>/{dino_features_dinov2_vitl14_reg,clip_image_features_CLIP-ViT-L-14-DataComp,
  clip_text_features_CLIP-ViT-L-14-DataComp}.h5``: 30 rows in all (train 17, val 5, test 8: the
  narratives of tests.data.remote_fixtures.openimages_files(REFERENCE_SIZES)) in the layout of
  the reference's extract_open_images.py (``features`` float32 gzip in row chunks, ``indices``
  int32 with indices[i] = i), read back through the reference's HDF5FeatureDataset.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import torch

REFERENCE_COMMIT = "7f36faa"
DIMS = {"dino": 16, "clip_img": 12, "clip_txt": 8}
L, K, AUXK = 64, 4, 8
ROWS = {"train": 17, "val": 5, "test": 8}
FILES = {"dino": "dino_features_dinov2_vitl14_reg.h5", "clip_img": "clip_image_features_CLIP-ViT-L-14-DataComp.h5",
         "clip_txt": "clip_text_features_CLIP-ViT-L-14-DataComp.h5"}
MIN_MARGIN = 1e-4


def import_reference(root: Path) -> types.SimpleNamespace:
    """The reference's model classes, utils and dataset from checkout ``root`` (see above)."""
    for name, folder in (("sparc", root / "sparc"), ("sparc.model", root / "sparc" / "model")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg
    kernels = types.ModuleType("sparc.kernels")
    kernels.TritonDecoderAutograd = None
    sys.modules["sparc.kernels"] = kernels
    import sparc.model.model_global as model_global
    import sparc.model.model_local as model_local
    import sparc.model.utils as utils
    from sparc.datasets import HDF5FeatureDataset

    assert Path(model_global.__file__).resolve().is_relative_to(root.resolve()), model_global.__file__
    return types.SimpleNamespace(models={"global": model_global.MultiStreamSparseAutoencoder,
                                         "local": model_local.MultiStreamSparseAutoencoder},
                                 utils=utils, dataset=HDF5FeatureDataset)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """HDF5FeatureDataset's normalisation: x / (||x|| + 1e-8) per row."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def write_h5(path: Path, features: np.ndarray) -> None:
    """The reference extractor's layout (extract_open_images.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n, d = features.shape
    with h5py.File(path, "w", libver="latest") as h5f:
        feat = h5f.create_dataset("features", (n, d), "float32", chunks=(min(32, n), d), compression="gzip")
        idx = h5f.create_dataset("indices", (n,), "int32")
        feat[np.arange(n), :] = features
        idx[np.arange(n)] = np.arange(n)


def train_steps(ref, model, data: dict[str, torch.Tensor], steps: int = 5) -> None:
    """The reference's training step (sparc/train.py), ``steps`` times on ``data``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    for _ in range(steps):
        opt.zero_grad()
        out = model(data)
        loss, _ = model.compute_loss(out, data, 1 / 32, 1.0)
        loss.backward()
        for dec in model.decoders.values():
            ref.utils.unit_norm_decoder_grad_adjustment_(dec)
        opt.step()
        for dec in model.decoders.values():
            ref.utils.unit_norm_decoder_(dec)


def margin(model, x: dict[str, torch.Tensor], rule: str) -> float:
    """Smallest gap between the k-th and (k+1)-th selection scores over the batch (ties would make
    the index sets depend on float summation order)."""
    with torch.no_grad():
        logits = {s: torch.nn.functional.linear(v - model.pre_biases[s], model.encoders[s].weight, model.latent_biases[s])
                  for s, v in x.items()}
    scores = [sum(logits.values())] if rule == "global" else list(logits.values())
    top = [torch.topk(h, K + 1, dim=1).values for h in scores]
    return float(min((t[:, K - 1] - t[:, K]).min() for t in top))


def main(root: Path, out: Path) -> None:
    ref = import_reference(root)
    rng = np.random.default_rng(0)
    # Features with a shared low-rank structure across streams (so the SAE has something to fit).
    total = sum(ROWS.values())
    z = rng.standard_normal((total, 6))
    feats = {s: (z @ rng.standard_normal((6, d)) + 0.3 * rng.standard_normal((total, d))).astype(np.float32)
             for s, d in DIMS.items()}
    start = 0
    for split, n in ROWS.items():
        for s in DIMS:
            write_h5(out / "features" / split / FILES[s], feats[s][start : start + n])
        start += n
    files = {s: str(out / "features" / "test" / FILES[s]) for s in DIMS}
    dataset = ref.dataset(files)
    x_np = {s: np.stack([dataset[i][s] for i in range(len(dataset))]) for s in DIMS}
    dataset.close()
    train = {s: torch.from_numpy(unit_rows(feats[s][: ROWS["train"]])) for s in DIMS}
    x = {s: torch.from_numpy(v) for s, v in x_np.items()}
    arrays: dict[str, np.ndarray] = {}
    for rule, cls in ref.models.items():
        for seed in range(100):
            torch.manual_seed(seed)
            model = cls(d_streams=dict(DIMS), n_latents=L, k=K, auxk=AUXK, dead_steps_threshold=2)
            train_steps(ref, model, train)
            if margin(model, x, rule) > MIN_MARGIN:
                break
        else:
            raise SystemExit(f"{rule}: no seed gave a top-k margin above {MIN_MARGIN}")
        model.eval()
        with torch.no_grad():
            outputs = model(x)
        (out / rule).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / rule / "msae_checkpoint.pth")
        args = {"n_latents": L, "k": K, "auxk": AUXK, "use_sparse_decoder": False, "topk_type": rule,
                "dead_steps_threshold": 2, "auxk_threshold": 1e-3, "seed": seed, "num_epochs": 0,
                "reference_commit": REFERENCE_COMMIT}
        config = {"train_stream_feature_files": {s: f"features/train/{FILES[s]}" for s in DIMS}}
        (out / rule / "run_config.json").write_text(json.dumps({"args": args, "config_file_content": config}, indent=4) + "\n")
        for s in DIMS:
            arrays[f"{rule}/x/{s}"] = x_np[s]
            arrays[f"{rule}/codes/{s}"] = outputs[f"sparse_codes_{s}"].numpy()
            arrays[f"{rule}/indices/{s}"] = outputs["shared_indices" if rule == "global" else f"indices_{s}"].numpy()
            for t in DIMS:
                key = f"recon_{t}" if s == t else f"cross_recon_{t}_from_{s}"
                arrays[f"{rule}/recon/{t}/{s}"] = outputs[key].numpy()
    np.savez_compressed(out / "outputs.npz", **arrays)
    print(f"wrote {out} with the reference code at {root} (commit {REFERENCE_COMMIT})")


def check_export(root: Path, exported: Path, rule: str, fixtures: Path) -> None:
    """Load ``exported/msae_checkpoint.pth`` (written by ``python -m sparc export --reference``
    from the imported ``rule`` fixture) into the reference's class with its own loader
    (``load_state_dict(torch.load(..., weights_only=True))``, strict) and compare its forward
    outputs with ``outputs.npz``: the round trip import -> export -> reference."""
    ref = import_reference(root)
    args = json.loads((exported / "run_config.json").read_text())["args"]
    state = torch.load(exported / "msae_checkpoint.pth", map_location="cpu", weights_only=True)
    model = ref.models[args["topk_type"]](d_streams=dict(DIMS), n_latents=args["n_latents"], k=args["k"],
                                          auxk=args["auxk"], use_sparse_decoder=args["use_sparse_decoder"])
    model.load_state_dict(state)
    model.eval()
    expected = np.load(fixtures / "outputs.npz")
    with torch.no_grad():
        outputs = model({s: torch.from_numpy(expected[f"{rule}/x/{s}"]) for s in DIMS})
    worst = max(float(np.abs(outputs[f"sparse_codes_{s}"].numpy() - expected[f"{rule}/codes/{s}"]).max()) for s in DIMS)
    assert worst <= 1e-6, worst
    print(f"{rule}: the reference's model loaded {exported} and reproduced outputs.npz (max |diff| {worst:.2e})")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[2] == "--check":  # make_fixtures.py REF --check EXPORTED RULE FIXTURES
        check_export(Path(sys.argv[1]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    elif len(sys.argv) in (2, 3):
        main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).resolve().parent)
    else:
        raise SystemExit(__doc__)
