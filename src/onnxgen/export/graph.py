"""Building large ONNX graphs: fresh names, weights in a chosen type, bytes streamed to disk."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    if array.dtype == ml_dtypes.bfloat16:  # numpy_helper has no bfloat16: store the raw bits
        tensor = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)
        return tensor
    return numpy_helper.from_array(array, name)


class ExternalWeights:
    """Writes large tensors' bytes straight into the external data file as the graph is built,
    so a build holds about one weight in memory, not the whole model."""

    THRESHOLD = 4096  # bytes; smaller tensors (shapes, scalars, index constants) stay inline

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open(path, "wb"), 0

    def move_out(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < self.THRESHOLD:
            return tensor
        pad = -self.offset % 64  # aligned, so the file can be memory-mapped
        self.file.write(b"\0" * pad)
        self.offset += pad
        data = tensor.raw_data
        self.file.write(data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)
        return tensor

    def close(self) -> None:
        self.file.close()


class GraphBuilder:
    """Nodes and initializers with fresh names: ``b.op("MatMul", x, w)`` returns the output name."""

    def __init__(self, dtype: np.dtype, external: ExternalWeights | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.dtype = dtype
        self.external = external
        self._count = 0

    def add(self, tensor: onnx.TensorProto) -> None:
        self.initializers.append(self.external.move_out(tensor) if self.external else tensor)

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", name: str | None = None,
           out_names: list[str] | None = None, **attrs) -> str | list[str]:
        outs = out_names or [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, name=name or self.name(op_type),
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight stored in the model's weight type; the float32 value to compute with."""
        self.add(_tensor(np.ascontiguousarray(array.astype(self.dtype)), name))
        if self.dtype == np.float32:
            return name
        return self.op("Cast", name, to=TensorProto.FLOAT)

    def small_weight(self, name: str, array: np.ndarray) -> str:
        """A float32 weight (norm scales, RoPE tables, sinks): too small to be worth narrowing."""
        self.add(numpy_helper.from_array(np.ascontiguousarray(array.astype(np.float32)), name))
        return name

    def const(self, array, dtype=None) -> str:
        """A small constant, kept inline (shapes and indices never go to external data)."""
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name
