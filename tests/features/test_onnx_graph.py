"""with_outputs on a hand-encoded ONNX model: x -> Neg -> y -> Abs -> z (output z)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from sparc.features.onnx_graph import graph_output_names, with_outputs


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, low = n >> 7, n & 0x7F
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes | str | int) -> bytes:
    """One protobuf field: an int as a varint, bytes / str length-delimited."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def value_info(name: str) -> bytes:
    """ValueInfoProto: name, float tensor of shape [3]."""
    shape = field(2, field(1, field(1, 3)))  # TensorShapeProto.dim { dim_value: 3 }
    return field(1, name) + field(2, field(1, field(1, 1) + shape))  # TypeProto.tensor_type


def node(op: str, x: str, y: str) -> bytes:
    return field(1, x) + field(2, y) + field(3, f"{op}_node") + field(4, op)


def tiny_model() -> bytes:
    graph = (
        field(1, node("Neg", "x", "y"))
        + field(1, node("Abs", "y", "z"))
        + field(2, "g")
        + field(11, value_info("x"))
        + field(12, value_info("z"))
    )
    # ir_version 8, graph, opset_import { domain "" version 13 }
    return field(1, 8) + field(7, graph) + field(8, field(1, "") + field(2, 13))


def run(model: bytes, x: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return names, session.run(None, {"x": x})


def test_original_model_runs():
    x = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    names, (z,) = run(tiny_model(), x)
    assert names == ["z"] and graph_output_names(tiny_model()) == ["z"]
    np.testing.assert_array_equal(z, np.abs(x))


def test_with_outputs_exposes_intermediate_tensor():
    x = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    edited = with_outputs(tiny_model(), ["y"])
    assert graph_output_names(edited) == ["y"]
    names, (y,) = run(edited, x)
    assert names == ["y"]
    np.testing.assert_array_equal(y, -x)
    names, outs = run(with_outputs(tiny_model(), ["y", "z"]), x)
    assert names == ["y", "z"]
    np.testing.assert_array_equal(outs[1], np.abs(x))


def test_with_outputs_errors():
    with pytest.raises(ValueError, match="no ONNX graph"):
        with_outputs(field(1, 8), ["y"])
    with pytest.raises(ValueError, match="no output names"):
        with_outputs(tiny_model(), [])
    with pytest.raises(ValueError, match="truncated"):
        with_outputs(tiny_model()[:-3], ["y"])
