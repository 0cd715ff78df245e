"""Expose an intermediate tensor of an ONNX model as its only output, without the ``onnx`` package.

An ONNX file is a serialised ``ModelProto`` protocol buffer. Its ``graph`` (field 7) is a
``GraphProto`` whose repeated ``output`` (field 12) lists ``ValueInfoProto`` entries, each with a
``name`` (field 1). :func:`with_outputs` walks the top-level fields of the model and of its graph
(protobuf wire format: varint keys ``field << 3 | wire_type``), drops the graph's outputs and
appends one ``ValueInfoProto`` per requested tensor name. Every other byte is kept as it is. ONNX
Runtime infers the type and shape of the new outputs and prunes the nodes no output needs.
"""

from __future__ import annotations

from collections.abc import Iterator

MODEL_GRAPH = 7  # ModelProto.graph
GRAPH_OUTPUT = 12  # GraphProto.output
VALUE_INFO_NAME = 1  # ValueInfoProto.name
LEN = 2  # wire type: length-delimited


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """Top-level fields of a message: ``(number, wire_type, start, payload_start, end)``."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        payload = pos
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == LEN:
            size, payload = _read_varint(buf, pos)
            pos = payload + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {start}")
        if pos > len(buf):
            raise ValueError(f"truncated protobuf field {number} at byte {start}")
        yield number, wire, start, payload, pos


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | LEN) + _varint(len(payload)) + payload


def graph_output_names(model: bytes) -> list[str]:
    """Names of the graph outputs of a serialised ONNX model."""
    names = []
    for number, wire, _, payload, end in _fields(model):
        if number == MODEL_GRAPH and wire == LEN:
            graph = model[payload:end]
            for gnum, gwire, _, gpayload, gend in _fields(graph):
                if gnum == GRAPH_OUTPUT and gwire == LEN:
                    info = graph[gpayload:gend]
                    for inum, iwire, _, ipayload, iend in _fields(info):
                        if inum == VALUE_INFO_NAME and iwire == LEN:
                            names.append(info[ipayload:iend].decode())
    return names


def with_outputs(model: bytes, names: list[str]) -> bytes:
    """The serialised ONNX ``model`` with its graph outputs replaced by tensors ``names``.

    ValueError when the bytes hold no graph. Whether each name exists in the graph is checked by
    ONNX Runtime when the session is created.
    """
    if not names:
        raise ValueError("with_outputs: no output names given")
    out = bytearray()
    found = False
    for number, wire, start, payload, end in _fields(model):
        if number == MODEL_GRAPH and wire == LEN and not found:
            graph = model[payload:end]
            new_graph = bytearray()
            for gnum, gwire, gstart, _, gend in _fields(graph):
                if not (gnum == GRAPH_OUTPUT and gwire == LEN):
                    new_graph += graph[gstart:gend]
            for name in names:
                new_graph += _length_delimited(GRAPH_OUTPUT, _length_delimited(VALUE_INFO_NAME, name.encode()))
            out += _length_delimited(MODEL_GRAPH, bytes(new_graph))
            found = True
        else:
            out += model[start:end]
    if not found:
        raise ValueError("with_outputs: the bytes hold no ONNX graph (ModelProto field 7)")
    return bytes(out)
