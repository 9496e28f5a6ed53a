"""onnxruntime sessions for models that use onnxgen's ops.

``session(model)`` registers onnxgen's kernel library with a stock onnxruntime CPU session, and
keeps each paged cache in one buffer bound (IOBinding) as both the cache input and its updated
output, so a step writes its new keys/values in place and copies nothing.  Nodes the kernels
cannot run (a graph attribute, ``ai.onnx.preview.FlexAttention``) are expanded into standard
ops first, except PagedAttention's ``score_mod``, compiled to a bytecode the kernel interprets
(``passes.compile_score_mod``), and FlexAttention nodes whose score_mod is pointwise, run by the
same kernel (``passes.flex_kernel``); without the library the whole model is expanded, with a
warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from .. import kernels
from ..ops.domain import DOMAIN
from ..passes import expand
from ..passes.bf16_linear import bf16_linear_for_session
from ..passes.compile_score_mod import compile_score_mods
from ..passes.flex_kernel import flex_to_kernel

_BF16 = np.dtype(ml_dtypes.bfloat16)


def cache_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """Cache inputs and the outputs that carry them on: ``key_cache.3`` -> ``key_cache_out.3``."""
    inputs = {i.name for i in model.graph.input}
    pairs = {}
    for output in model.graph.output:
        name = output.name.replace("_out", "", 1)
        if name != output.name and name in inputs:
            pairs[name] = output.name
    return pairs


def _needs_expansion(node: ir.Node) -> bool:
    """Nodes the kernel library cannot run: graph attributes are invisible to custom ops."""
    if node.domain == "ai.onnx.preview" and node.op_type == "FlexAttention":
        return True
    return node.domain == DOMAIN and any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values())


def ort_value(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over ``array``'s memory (bf16 through its bits: numpy has no bf16 for ORT)."""
    if array.dtype == _BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


class Session:
    """An onnxruntime session whose caches live in buffers it owns and updates in place.

    ``run(feeds)`` takes every input but the caches and returns the other outputs by name;
    ``caches`` holds the current cache arrays (set them with ``set_cache``, or let the session
    start them at zero).  ``bf16_compute``: run linear layers with bf16 weights on the kernels'
    AMX path (``passes.bf16_linear``: activations rounded to bf16); default: where the CPU has AMX.
    """

    def __init__(self, model: onnx.ModelProto, *, threads: int | None = None, spinning: bool = False,
                 use_kernels: bool = True, bf16_compute: bool | None = None):
        library = kernels.library_path() if use_kernels else None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        # Spinning threads slow down whatever else the process computes between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if library:
            options.register_custom_ops_library(library)
            # score_mod graphs become bytecode the kernel reads; those it cannot compile (a
            # warning names the op) keep their graph and are expanded below.
            runnable = expand(compile_score_mods(flex_to_kernel(model)), only=_needs_expansion)
            # bf16 weights: the linear layers on the tile unit, activations rounded to bf16.
            runnable = bf16_linear_for_session(runnable, bf16_compute)
        else:
            if use_kernels:
                warnings.warn("onnxgen's kernel library is not built: running the expanded model (slow; "
                              "reinstall onnxgen where the onnxruntime headers can be fetched)", stacklevel=3)
            runnable = expand(compile_score_mods(model, to_bytecode=False))  # checks the score_mods
        self.uses_kernels = bool(library)
        self.session = ort.InferenceSession(runnable.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.pairs = cache_pairs(model)
        self.caches: dict[str, np.ndarray] = {}
        self._bound: dict[str, ort.OrtValue] = {}
        self._cache_types = {i.name: i for i in self.session.get_inputs() if i.name in self.pairs}
        self.output_names = [o.name for o in self.session.get_outputs() if o.name not in self.pairs.values()]

    def set_cache(self, name: str, array: np.ndarray) -> None:
        """Use ``array`` (C-contiguous) as the cache ``name``: steps update it in place."""
        if name not in self.pairs:
            raise KeyError(f"{name!r} is not a cache input of this model (caches: {sorted(self.pairs)})")
        array = np.ascontiguousarray(array)
        self.caches[name] = array
        self._bound[name] = ort_value(array)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = set(feeds) & set(self.pairs)
        if unknown:
            raise ValueError(f"caches are held by the session: use set_cache for {sorted(unknown)}")
        missing = set(self.pairs) - set(self.caches)
        if missing:
            raise ValueError(f"no cache set for {sorted(missing)}: call set_cache first")
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort_value(np.ascontiguousarray(array)))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        for name, output in self.pairs.items():
            value = self._bound[name]
            binding.bind_ortvalue_input(name, value)
            if self.uses_kernels:
                binding.bind_ortvalue_output(output, value)  # one buffer: the kernel writes in place
            else:
                binding.bind_output(output, "cpu")
        self.session.run_with_iobinding(binding)
        bound = self.output_names + list(self.pairs.values())  # get_outputs() follows the binding order
        outputs = dict(zip(bound, binding.get_outputs()))
        if not self.uses_kernels:  # the expanded graph returns new caches: adopt them
            for name, output in self.pairs.items():
                self._adopt(name, outputs[output])
        return {name: outputs[name].numpy() for name in self.output_names}

    def _adopt(self, name: str, value: ort.OrtValue) -> None:
        if self.caches[name].dtype == _BF16:
            raise NotImplementedError("bf16 caches need the kernel library (onnxruntime returns no numpy bf16)")
        self.caches[name][...] = value.numpy()


def session(model: onnx.ModelProto | str, **kwargs) -> Session:
    """A ``Session`` for ``model`` (a ModelProto or a path) on onnxruntime's CPU provider."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    return Session(model, **kwargs)
