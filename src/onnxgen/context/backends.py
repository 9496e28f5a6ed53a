"""The backends that make and run blobs.

``openvino``: the scope compiled by OpenVINO for the CPU and exported (``CompiledModel.export_model``);
loading is ``Core.import_model``, which skips reading the ONNX graph, OpenVINO's transformations
and kernel selection.  By default the blob is weightless (``openvino.compiled_model.weightless``):
exported with OpenVINO's weightless cache mode, it leaves out the weights the model keeps in its
external-data file, and the import reads them from that file (``WEIGHTS_PATH``), so the model
does not carry every weight twice.  A scope whose weights are not in one such file gets the full
compiled model (``openvino.compiled_model``), which still loads as before.

``onnxruntime``: the scope after onnxruntime's full graph optimisation (level ALL: constant folding,
fusions, layout changes), saved in ORT format; loading skips parsing ONNX, the optimisers and (for
onnxgen ops) the expand pass for graph attributes.  The blob records the kernel library it was made
with; custom ops resolve against onnxgen's kernels at load.

``onnxgen-kernels``, two formats (programs.py).  ``onnxgen.kernels.programs``: the scope's
PagedAttention score programs compiled and its FlexAttention nodes' rewrite onto the kernel
planned (data, no machine code), for this onnxgen's own kernel library; loading skips the
score_mod compiler and the FlexAttention rewrite (with its shape inference of the whole model),
and the scope runs in the same onnxruntime session as its neighbours.  ``onnxgen.kernels.library``:
onnxgen's compiled CPU kernel library itself (a shared library: native code), so a scope of
onnxgen ops runs on the kernels where this onnxgen has no built library and would otherwise run
the ops' function bodies (the expanded graph).  Used only when the caller passes
``allow_native_code=True``; the library is written to a private file after its sha256 is checked.

Each backend: ``version()`` (None when absent), ``supports(node)`` (for automatic scopes),
``compile(sub)`` -> (payload, blob fields), ``load(payload, blob, sub_inputs, sub_outputs)`` ->
a callable from feeds to outputs (or, for programs blobs, ``programs.Inline`` replacements).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..ops.domain import DOMAIN
from . import programs
from .format import EP_PREFIX, Blob, ContextError, cpu_hardware, is_known_backend, safe_blob_path
from .partition import external_layout


def has_onnxgen_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain in (DOMAIN, "ai.onnx.preview") for n in model.graph.node)


def ort_session(model: onnx.ModelProto | bytes, *, library: str | None = "default", threads: int | None = None,
                optimized_path: str | None = None, ort_format: bool = False, level=None,
                bf16_compute: bool | None = None):
    """An onnxruntime CPU session; onnxgen's kernels registered when the model needs them
    (``library="default"``: the package's own build), score_mods compiled and FlexAttention
    rewritten as ``onnxgen.backends.ort.session`` does (``compile_for_kernels``); nodes the
    kernels cannot run expanded; linear layers with bf16 weights on the kernels' bf16 path where
    ``bf16_compute`` wants it (default: an AMX CPU), also as that session does."""
    import onnxruntime as ort

    from .. import kernels
    from ..backends.ort import _needs_expansion
    from ..passes import expand
    from ..passes.bf16_linear import bf16_linear_for_session

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if level is not None:
        options.graph_optimization_level = level
    if optimized_path:
        options.optimized_model_filepath = optimized_path
        if ort_format:
            options.add_session_config_entry("session.save_model_format", "ORT")
    if isinstance(model, bytes):  # an ORT-format payload
        options.add_session_config_entry("session.load_model_format", "ORT")
        if library:
            options.register_custom_ops_library(kernels.library_path() if library == "default" else library)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    path = kernels.library_path() if library == "default" else library
    # Score programs and the bf16 rewrite's dense GroupedMatMul are this onnxgen's own: made only
    # for its own library (a shipped library blob runs score_mods expanded, as the function bodies).
    own = bool(path) and (library == "default" or path == kernels.library_path())
    if has_onnxgen_ops(model):
        if path:
            model = compile_for_kernels(model) if own else model
            if needs_expansion(model):
                model = expand(model, only=_needs_expansion)
        else:
            model = expand(model)
    if own:
        model = bf16_linear_for_session(model, bf16_compute)
    if path and has_onnxgen_ops(model):
        options.register_custom_ops_library(path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def needs_expansion(model: onnx.ModelProto) -> bool:
    """Whether ``expand(model, only=_needs_expansion)`` has anything to do for the kernel library: a
    FlexAttention node or an onnxgen node with a graph attribute anywhere, or model functions (which
    it inlines).  Without any, expand would only copy the model through onnx-ir and shape-infer it
    (0.2 s and more for a 24-layer model), so the session is made from the model as it is."""
    if model.functions:
        return True

    def walk(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            if node.domain == "ai.onnx.preview" and node.op_type == "FlexAttention":
                return True
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                if subgraphs and node.domain == DOMAIN:
                    return True
                if any(walk(g) for g in subgraphs):
                    return True
        return False

    return walk(model.graph)


def compile_for_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """What ``onnxgen.backends.ort.session`` does before the kernels run a model: FlexAttention
    nodes with a pointwise score_mod rewritten onto PagedAttention (``passes.flex_kernel``) and
    every PagedAttention score_mod compiled to its score program (``passes.compile_score_mod``).
    Each pass runs only where the model has something for it (both copy the whole model)."""
    from ..passes import compile_score_mod, flex_kernel

    if any(n.domain == flex_kernel.FLEX_DOMAIN and n.op_type == "FlexAttention" for n in model.graph.node):
        model = flex_kernel.flex_to_kernel(model)
    if any(n.domain == DOMAIN and n.op_type == "PagedAttention" and any(a.name == "score_mod" for a in n.attribute)
           for g in [model.graph, *model.functions] for n in g.node):
        model = compile_score_mod.compile_score_mods(model)
    return model


def ort_runner(session):
    names = [o.name for o in session.get_outputs()]

    def run(feeds):
        return dict(zip(names, session.run(names, feeds)))

    run.session = session
    return run


# --------------------------------------------------------------------------- OpenVINO


class OpenVINO:
    name = "openvino"
    format = "openvino.compiled_model"
    # The compiled model without the weights the ONNX model keeps in its external-data file; at
    # import OpenVINO reads them from that file (see compile_weightless).
    weightless_format = "openvino.compiled_model.weightless"
    formats = (weightless_format, format)
    alternatives = frozenset(formats)  # a blob of one replaces a blob of the other (same version)
    device = "CPU"

    @functools.cached_property
    def core(self):
        import openvino as ov

        return ov.Core()

    def version(self) -> str | None:
        try:
            import openvino as ov
        except ImportError:
            return None
        return ov.get_version()

    # OpenVINO 2026.4 fuses RotaryEmbedding into an internal op that import_model restores wrong
    # (garbage outputs after export/import, right ones straight from compile_model): kept out.
    unsupported = frozenset({"RotaryEmbedding"})
    # Without the hint, OpenVINO picks bf16 matmuls on CPUs with AMX/avx512_bf16 (errors ~1e-3);
    # the hint is not stored in the exported blob, so it is recorded and passed again at import.
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    # Weightless export and import.  The value is a string: OpenVINO 2026.4's Python enum
    # (openvino.properties.CacheMode.OPTIMIZE_SIZE) is refused by the CPU plugin ("Wrong value for
    # property key CACHE_MODE"), and ENABLE_WEIGHTLESS alone exports every weight.
    weightless_config = {"CACHE_MODE": "OPTIMIZE_SIZE"}

    def supports(self, node: onnx.NodeProto) -> bool:
        # OpenVINO's ONNX frontend: standard ops only
        return node.domain in ("", "ai.onnx") and node.op_type not in self.unsupported

    def compile(self, sub: onnx.ModelProto, *, format: str | None = None, external: onnx.ModelProto | None = None,
                base_dir: str | os.PathLike | None = None, **_) -> tuple[bytes, dict]:
        """A weightless blob where the scope's weights lie in one external-data file of the model
        (``external``: the scope's model with those references kept; ``base_dir``: the model's
        folder), else (or with ``format`` = the full format) the compiled model with its weights."""
        refused = sorted({n.op_type for n in sub.graph.node if not self.supports(n)})
        if refused:
            raise ContextError(f"OpenVINO blobs are not made for scopes with {', '.join(refused)}")
        if format != self.format:
            try:
                return self.compile_weightless(external, base_dir)
            except Exception as error:  # noqa: BLE001 - no weightless blob: the full one (unless asked for)
                if format == self.weightless_format:
                    raise ContextError(f"no weightless OpenVINO blob: {str(error).strip().splitlines()[-1]}") from None
        compiled = self.compile_from_graph(sub)
        return compiled.export_model().getvalue(), dict(format=self.format, hardware=cpu_hardware(),
                                                        options={"device": self.device, "config": dict(self.config)})

    def compile_weightless(self, external: onnx.ModelProto | None, base_dir) -> tuple[bytes, dict]:
        """The scope compiled from a copy of its model that still points at the model's weights file,
        exported with OpenVINO's weightless cache mode: the constants OpenVINO read from that file
        are left out of the blob, which records the file and where each weight lies in it (their
        names, offsets and lengths: at load the same layout is required, and the scope's content
        hash has already checked the values).  ContextError says why it cannot be made."""
        if external is None or base_dir is None:
            raise ContextError("a weightless blob needs the scope's model with its external data references")
        layout = external_layout(external)
        files = sorted({location for _, location, _, _ in layout})
        if len(files) != 1:
            raise ContextError(f"a weightless blob needs the scope's weights in one external-data file "
                               f"(they are in {len(files)})")
        weights_file = safe_blob_path(base_dir, files[0])
        ov_model = self._read_in_folder(external, base_dir)
        stray = _marked_weights(ov_model) - {name for name, _, _, _ in layout}
        if stray:  # OpenVINO would leave out weights that are not in the file: not weightless then
            raise ContextError(f"OpenVINO marked weights outside the external-data file: {sorted(stray)[:3]}")
        compiled = self.core.compile_model(ov_model, self.device, {**self.config, **self.weightless_config})
        payload = compiled.export_model().getvalue()
        options = {"device": self.device, "config": dict(self.config),
                   "weights": {"path": files[0], "layout": _layout_digest(layout)}}
        self.core.import_model(payload, self.device, self._import_config(options, weights_file))  # it loads
        return payload, dict(format=self.weightless_format, hardware=cpu_hardware(), options=options)

    def _read_in_folder(self, model: onnx.ModelProto, folder):
        """``Core.read_model`` of ``model``, whose external-data references are relative to ``folder``.
        Only a model read from a file that refers to the weights file gets its weights marked with
        their offsets in it, so the model is written into ``folder`` for that time (OpenVINO's
        frontend refuses a symlink to a weights file outside the model's own folder)."""
        fd, path = tempfile.mkstemp(prefix=".onnxgen-scope-", suffix=".onnx", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            return self.core.read_model(path)
        finally:
            os.unlink(path)

    def load(self, payload: bytes, blob: Blob, inputs: list[str], outputs: list[str], *,
             external=None, base_dir: str | os.PathLike | None = None, **_):
        """``external()``: the scope's model with its external data references (weightless blobs
        check the weights' layout against it); ``base_dir``: the model's folder."""
        if blob.format == self.weightless_format:
            weights_file = self._weights_file(blob, external, base_dir)
        elif blob.format == self.format:
            weights_file = None
        else:
            raise ContextError(f"unknown OpenVINO blob format {blob.format!r}")
        compiled = self.core.import_model(payload, blob.options.get("device", self.device),
                                          self._import_config(blob.options, weights_file))
        ports = {}
        for port in compiled.outputs:
            for name in port.get_names():
                ports[name] = port
        missing = [o for o in outputs if o not in ports]
        if missing:
            raise ContextError(f"the OpenVINO blob has no outputs {missing}")
        request = compiled.create_infer_request()

        def run(feeds):
            result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
            return {o: np.array(result[ports[o]], copy=True) for o in outputs}

        run.compiled = compiled
        return run

    def _import_config(self, options: dict, weights_file: Path | None) -> dict:
        config = dict(options.get("config", {}))
        if weights_file is not None:
            config.update(self.weightless_config, WEIGHTS_PATH=str(weights_file))
        return config

    def _weights_file(self, blob: Blob, external, base_dir) -> Path:
        """The weights file a weightless blob reads, after checking it is in the model's folder and
        holds the scope's weights where the blob expects them."""
        weights = blob.options.get("weights")
        if not isinstance(weights, dict) or not isinstance(weights.get("path"), str):
            raise ContextError("a weightless OpenVINO blob must name its weights file (options.weights.path)")
        if external is None or base_dir is None:
            raise ContextError("a weightless OpenVINO blob needs the model's folder and the scope's weights")
        path = safe_blob_path(base_dir, weights["path"])  # the same confinement as blob files
        if not path.is_file():
            raise ContextError(f"weights file {weights['path']!r} of the weightless blob is missing")
        layout = external_layout(external())
        if {location for _, location, _, _ in layout} != {weights["path"]} or \
                _layout_digest(layout) != weights.get("layout"):
            raise ContextError(f"the scope's weights no longer lie in {weights['path']!r} where the weightless "
                               "blob expects them (the model was saved again with another layout)")
        return path

    def compile_from_graph(self, sub: onnx.ModelProto):
        """The scope compiled from its model (weights in it); also what a load without the blob pays."""
        return self.core.compile_model(self.core.read_model(sub.SerializeToString(), b""), self.device, self.config)


def _marked_weights(ov_model) -> set[str]:
    """The constants OpenVINO's frontend marked as read from a weights file (what a weightless
    export leaves out)."""
    return {op.get_friendly_name() for op in ov_model.get_ops() if op.get_type_name() == "Constant"
            and any(key.startswith("WeightlessCacheAttribute") for key in op.get_rt_info().keys())}


def _layout_digest(layout: list[list]) -> str:
    """``sha256:`` of a weights layout (``partition.external_layout``), canonical JSON."""
    return "sha256:" + hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- onnxruntime


def _library_sha256() -> str | None:
    from .. import kernels

    path = kernels.library_path()
    if not path:
        return None
    st = os.stat(path)
    return _file_sha256(str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, *identity) -> str:  # keyed by the file's identity: a rebuilt library is hashed again
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class OnnxRuntime:
    name = "onnxruntime"
    format = "ort"

    def version(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        return ort.__version__

    def supports(self, node: onnx.NodeProto) -> bool:
        return True

    def compile(self, sub: onnx.ModelProto, **_) -> tuple[bytes, dict]:
        import onnxruntime as ort

        options = {}
        if has_onnxgen_ops(sub):
            library = _library_sha256()
            if library is None:
                raise ContextError("the scope has onnxgen ops and this onnxgen has no kernel library")
            options["kernels_sha256"] = library
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "scope.ort")
            # fp32 linear layers, as the graph says: the bf16 rewrite is a session's private choice
            # (its dense GroupedMatMul is never written to a file), and a blob is a file.
            ort_session(sub, optimized_path=path, ort_format=True, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                        bf16_compute=False)
            payload = Path(path).read_bytes()
        return payload, dict(format=self.format, hardware=cpu_hardware(), options=options)

    def load(self, payload: bytes, blob: Blob, inputs: list[str], outputs: list[str], **_):
        needs = blob.options.get("kernels_sha256")
        if needs and needs != _library_sha256():
            raise ContextError("the blob was optimised with another build of onnxgen's kernel library")
        return ort_runner(ort_session(payload, library="default" if needs else None))


# --------------------------------------------------------------------------- onnxgen's kernels


class OnnxgenKernels:
    """Two formats (``programs.py``): ``onnxgen.kernels.programs``, the scope's score programs
    compiled and FlexAttention rewritten (data: run by this onnxgen's own kernel library in the
    onnxruntime session of the rest of the model); ``onnxgen.kernels.library``, the kernel library
    itself (native code, opt-in)."""

    name = "onnxgen-kernels"
    format = programs.LIBRARY_FORMAT
    formats = (programs.FORMAT, programs.LIBRARY_FORMAT)
    min_nodes = 1  # one attention or MoE node is worth a blob

    def version(self) -> str | None:
        import onnxruntime as ort

        from .. import __version__

        return f"onnxgen {__version__}; onnxruntime {ort.__version__}"

    def supports(self, node: onnx.NodeProto) -> bool:
        return node.domain == DOMAIN or (node.domain == "ai.onnx.preview" and node.op_type == "FlexAttention")

    def compile(self, sub: onnx.ModelProto, *, format: str | None = None, scope_hash: str | None = None,
                **_) -> tuple[bytes, dict]:
        """``format`` None: the programs where the scope has score_mods or FlexAttention nodes to
        compile, else the library."""
        from .. import kernels

        if format not in (None, *self.formats):
            raise ContextError(f"onnxgen-kernels makes {' or '.join(self.formats)} blobs, not {format}")
        if not has_onnxgen_ops(sub):
            raise ContextError("the scope has no onnxgen ops: the kernel library would not run any of it")
        if format == programs.FORMAT or (format is None and programs.has_programs(sub)):
            library = _library_sha256()
            if library is None:
                raise ContextError("this onnxgen has no built kernel library to compile programs for")
            if scope_hash is None:
                raise ContextError("a programs blob needs the scope's content hash")
            payload = programs.make(sub, scope_hash=scope_hash, kernels_sha256=library)
            return payload, dict(format=programs.FORMAT, hardware={"device": "cpu"},
                                 options={"kernels_sha256": library, "compiler": programs.compiler_id()})
        path = kernels.library_path()
        if path is None:
            raise ContextError("this onnxgen has no built kernel library to ship")
        return Path(path).read_bytes(), dict(format=programs.LIBRARY_FORMAT, hardware=cpu_hardware(),
                                             native_code=True, options={"library": Path(path).name})

    def problem(self, blob: Blob) -> str | None:
        """Why a programs blob is stale here (from its options; the payload is checked at load)."""
        if blob.format != programs.FORMAT:
            return None
        library = _library_sha256()
        if library is None:
            return "this onnxgen has no built kernel library to run the programs"
        if blob.options.get("kernels_sha256") != library:
            return "the programs were made for another build of onnxgen's kernel library"
        if blob.options.get("compiler") != programs.compiler_id():
            return f"the programs were made by another score compiler ({blob.options.get('compiler')})"
        return None

    def load(self, payload: bytes, blob: Blob, inputs: list[str], outputs: list[str], *,
             sub: onnx.ModelProto | None = None, allow_native_code: bool = False, nodes=None,
             scope_hash: str | None = None, infos=None, taken=None, prefix: str = "onnxgen.context", **_):
        """A programs blob: the ``programs.Inline`` replacements for the scope's ``nodes`` (the
        loader runs them with the rest of the model); a library blob: a runner of ``sub``."""
        if blob.format == programs.FORMAT:
            if blob.native_code:
                raise ContextError("a programs blob is data: it must not be marked native_code")
            return programs.read(payload, nodes, scope_hash=scope_hash, kernels_sha256=_library_sha256(),
                                 infos=infos, taken=taken, prefix=prefix)
        if blob.format != programs.LIBRARY_FORMAT:
            raise ContextError(f"unknown onnxgen-kernels blob format {blob.format!r}")
        if not allow_native_code:
            raise ContextError("the blob is a shared library (native code): pass allow_native_code=True to use it")
        if not blob.native_code:
            raise ContextError("a kernel-library blob must be marked native_code")
        folder = Path(tempfile.mkdtemp(prefix="onnxgen-context-"))  # 0700, ours alone
        path = folder / "kernels.so"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o500)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        if hashlib.sha256(path.read_bytes()).hexdigest() != blob.sha256:
            raise ContextError("the written library does not match its sha256")
        run = ort_runner(ort_session(sub, library=str(path)))
        run.library = str(path)
        return run


# --------------------------------------------------------------------------- onnxruntime's execution providers


class OnnxRuntimeEP:
    """Blobs imported from EPContext models (``epcontext.import_epcontext``): the payload of one
    ``com.microsoft.EPContext`` node, run by rebuilding that node alone (payload embedded) in an
    onnxruntime session on its execution provider, CPU fallback disabled.  Nothing here compiles
    them; they are usable only where this onnxruntime has the provider, whose own checks (SDK
    version, device) apply when it loads the blob: a refusal falls back with a warning."""

    format = "onnxruntime.epcontext"

    def __init__(self, source: str):
        self.source = source
        self.name = EP_PREFIX + source

    def provider(self) -> str | None:
        """The available provider the EPContext ``source`` names (``X`` or ``XExecutionProvider``)."""
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        want = self.source.lower()
        for p in ort.get_available_providers():
            if p.lower() in (want, want + "executionprovider"):
                return p
        return None

    def version(self) -> str | None:
        return None  # not knowable from outside the provider: see problem()

    def problem(self, blob: Blob) -> str | None:
        if self.provider() is None:
            import onnxruntime as ort

            return (f"this onnxruntime has no {self.source} (has "
                    f"{', '.join(p.removesuffix('ExecutionProvider') for p in ort.get_available_providers())})")
        return None

    def supports(self, node: onnx.NodeProto) -> bool:
        return False

    def compile(self, sub: onnx.ModelProto, **_) -> tuple[bytes, dict]:
        raise ContextError("blobs of onnxruntime execution providers are imported from EPContext models "
                           "(onnxgen context import-epcontext), not compiled here")

    def load(self, payload: bytes, blob: Blob, inputs: list[str], outputs: list[str], *, types=None, **_):
        import onnxruntime as ort
        from onnx import helper

        provider = self.provider()
        if provider is None:
            raise ContextError(self.problem(blob))
        o = blob.options
        if int(o.get("main_context", 1)) != 1:
            raise ContextError("the partition shares another node's context (main_context=0): not run alone")
        if types is None:
            raise ContextError("the value types of the scope's boundary are needed to rebuild the EPContext node")
        known = types()
        attrs = {k: o[k] for k in ("partition_name", "notes", "hardware_architecture", "onnx_model_filename",
                                   "max_size") if k in o}
        if blob.backend_version != "unspecified":
            attrs["ep_sdk_version"] = blob.backend_version
        ep_inputs, ep_outputs = list(o.get("inputs", inputs)), list(o.get("outputs", outputs))
        node = helper.make_node("EPContext", ep_inputs, ep_outputs, name=o.get("node_name", "EPContext"),
                                domain="com.microsoft", embed_mode=1, main_context=1, ep_cache_context=payload,
                                source=self.source, **attrs)
        graph = helper.make_graph([node], "epcontext", [helper.make_value_info(n, known[n]) for n in ep_inputs if n],
                                  [helper.make_value_info(n, known[n]) for n in ep_outputs if n])
        opsets = dict(o.get("opsets", {}))
        opsets.setdefault("com.microsoft", 1)
        opset_ids = [helper.make_opsetid(d, v) for d, v in opsets.items()]
        # The EPContext model's own IR version: this onnx's newest may be newer than the onnxruntime
        # with the provider reads (onnxruntime-openvino 1.24 refuses IR 14).  Blobs imported before
        # it was recorded get the oldest IR version their opsets allow.
        ir_version = o.get("ir_version") or helper.find_min_ir_version_for(opset_ids, ignore_unknown=True)
        model = helper.make_model(graph, opset_imports=opset_ids, ir_version=ir_version)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])

        def run(feeds):
            got = dict(zip(ep_outputs, session.run(ep_outputs, {n: feeds[n] for n in ep_inputs if n})))
            return {n: got[n] for n in outputs}

        run.session = session
        return run


BACKENDS = {b.name: b for b in (OpenVINO(), OnnxRuntime(), OnnxgenKernels())}


@functools.lru_cache(maxsize=None)
def _ep_backend(name: str) -> OnnxRuntimeEP:
    return OnnxRuntimeEP(name[len(EP_PREFIX):])


def backend_for(name: str):
    """The backend that runs blobs named ``name`` (a fixed one, or one per execution provider), or None."""
    if name in BACKENDS:
        return BACKENDS[name]
    return _ep_backend(name) if is_known_backend(name) else None


def backend_problem(blob: Blob) -> str | None:
    """Why this machine's software cannot use ``blob`` (None when it can)."""
    backend = backend_for(blob.backend)
    if backend is None:
        return f"unknown backend {blob.backend!r}"
    if isinstance(backend, OnnxRuntimeEP):
        return backend.problem(blob)
    version = backend.version()
    if version is None:
        return f"{blob.backend} is not installed"
    if version != blob.backend_version:
        return f"made by {blob.backend} {blob.backend_version}, this machine has {version}"
    return backend.problem(blob) if hasattr(backend, "problem") else None
