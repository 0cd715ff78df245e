"""Random weights: a model's real architecture, preprocessing and tokenizer, randomly initialised.

The spec option ``weights=random`` of the ``dinov2``, ``openclip`` and ``transformers`` families
builds the named model at its real size with no network access and no weight file: its cost,
memory and output shapes are the real ones, the numbers it computes mean nothing. It is how the
paper's streams (DINOv2 ViT-L/14 with registers, OpenCLIP ViT-L-14) run where their weights
cannot be downloaded (``make paper WEIGHTS=random``, ``benchmarks/paper_cost.py``).

Where the architecture comes from (:func:`config_source`, ``transformers`` and ``dinov2``): a
directory written by ``save_pretrained``; else the hub name's files in the local Hugging Face
cache; else :data:`KNOWN_MODELS`, copies of the ``config.json`` and ``preprocessor_config.json``
of the hub models this project names (the paper's and the USAE paper's), written to a temporary
directory so they load through the same ``from_pretrained`` calls as the real files. OpenCLIP
ships its architectures and tokenizer (``sparc.features.openclip``).

Initialisation is seeded (:data:`SEED`, :func:`seeded`): the same spec gives the same weights on
one machine. Every output made from them says so: the stream's ``meta.json`` carries
:func:`meta_fields`, and the evaluation, the concept browser and ``python -m sparc show`` repeat
it (:func:`random_streams`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from sparc.features.base import hub_offline

SEED = 0
WARNING = "random weights: the architecture is real, the features are meaningless; not a result"

_DINOV2_PROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def _dinov2(hidden: int, layers: int, heads: int, registers: int) -> dict:
    """A DINOv2 (``registers`` > 0: with registers) ViT/14 as its hub ``config.json`` gives it."""
    config = {
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "num_channels": 3, "qkv_bias": True,
        "hidden_act": "gelu", "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "use_swiglu_ffn": False,
        "initializer_range": 0.02, "drop_path_rate": 0.0,
    }
    if registers:
        config["num_register_tokens"] = registers
    return {"config": config, "preprocessor": _DINOV2_PROCESSOR}


_DINOV2_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}

# hub name -> {"config": config.json, "preprocessor": preprocessor_config.json}, the values of the
# hub's files that differ from transformers' defaults.
KNOWN_MODELS: dict[str, dict] = {
    **{f"facebook/dinov2-{size}": _dinov2(*dims, registers=0) for size, dims in _DINOV2_SIZES.items()},
    **{f"facebook/dinov2-with-registers-{size}": _dinov2(*dims, registers=4) for size, dims in _DINOV2_SIZES.items()},
    "google/vit-base-patch16-224": {
        "config": {"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "qkv_bias": True,
                   "layer_norm_eps": 1e-12},
        "preprocessor": {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                         "size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True,
                         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                         "image_std": [0.5, 0.5, 0.5]},
    },
    "google/siglip-base-patch16-224": {
        "config": {"model_type": "siglip",
                   "text_config": {"model_type": "siglip_text_model", "hidden_size": 768, "intermediate_size": 3072,
                                   "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 32000,
                                   "max_position_embeddings": 64},
                   "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 768,
                                     "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                                     "image_size": 224, "patch_size": 16}},
        "preprocessor": {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                         "size": {"height": 224, "width": 224}, "resample": 3, "do_rescale": True,
                         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                         "image_std": [0.5, 0.5, 0.5]},
    },
}


def _cached_config(name: str) -> bool:
    """True when hub model ``name``'s ``config.json`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # huggingface_hub rejects malformed repository ids
        return False


@contextmanager
def config_source(name: str, family: str) -> Iterator[tuple[str, str]]:
    """``(source, origin)``: where ``from_pretrained(source, local_files_only=True)`` reads model
    ``name``'s config, image processor and tokenizer without the network (module docstring), and
    a description of that place for the stream's metadata. A :data:`KNOWN_MODELS` entry lives in a
    temporary directory for the block. ValueError naming ``family`` when there is none."""
    path = Path(name).expanduser()
    if path.is_dir():
        yield str(path), "directory"
    elif _cached_config(name):
        yield name, "Hugging Face cache"
    elif name in KNOWN_MODELS:
        with tempfile.TemporaryDirectory(prefix="sparc-config-") as tmp:
            for file, key in (("config.json", "config"), ("preprocessor_config.json", "preprocessor")):
                (Path(tmp) / file).write_text(json.dumps(KNOWN_MODELS[name][key]))
            yield tmp, "sparc.features.random_weights.KNOWN_MODELS"
    else:
        offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        raise ValueError(
            f"{family}: weights=random needs {name!r}'s config without the network{offline}: give a directory "
            f"with its config.json, cache it, or use one of {', '.join(KNOWN_MODELS)}"
        )


@contextmanager
def seeded() -> Iterator[None]:
    """Torch's random state seeded with :data:`SEED` for the block, then restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def meta_fields(origin: str) -> dict:
    """The entries a random-weight stream adds to its ``meta.json`` (``origin``: where the
    architecture's config came from)."""
    return {"weights": "random", "weights_seed": SEED, "config_source": origin, "warning": WARNING}


def random_streams(metas: Mapping[str, Mapping]) -> list[str]:
    """The streams, in the order of ``metas`` (stream -> its ``meta.json``), whose features were
    made with random weights."""
    return [name for name, meta in metas.items() if meta.get("weights") == "random"]
