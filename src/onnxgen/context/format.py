"""The backend-context format: scopes on nodes, a manifest on the model, blobs beside or inside it.

A *scope* is a named group of nodes of the main graph, marked on each node by the node-level
``metadata_props`` entry ``onnxgen.context.scope``.  The graph itself is never changed: every
node keeps its place, inputs, outputs and attributes, so a runtime that knows nothing of this
format runs the model as it always did.

The *manifest* is one versioned JSON document in the model-level ``metadata_props`` entry
``onnxgen.context.manifest``.  Per scope it lists the boundary values (what flows in, what flows
out), a content hash of the scope (its nodes, their attributes, the opsets they use and the
weights they read: see ``content_hash``), and the blobs compiled from it, one per backend and
build: backend name and version, hardware requirements, format, sha256 and size of the payload,
and the payload itself (base64 in the manifest) or a path relative to the model's folder.

``SCHEMA`` is the manifest's JSON schema (docs/backend-context.schema.json is written from it);
``check(model_path)`` validates a file against the schema and everything a schema cannot say
(hashes, boundaries, paths, payloads), and reports which blobs this machine could use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import platform
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import onnx
from onnx import numpy_helper

from .cache import file_identity

SCOPE_KEY = "onnxgen.context.scope"
MANIFEST_KEY = "onnxgen.context.manifest"
FORMAT = "onnxgen.context"
VERSION = 1
HASH_SCHEME = "onnxgen.context.hash/1"

# Every backend this version knows how to run (see backends.py); others are refused.
KNOWN_BACKENDS = ("openvino", "onnxruntime", "onnxgen-kernels")
# ... and a family: blobs of onnxruntime execution providers, imported from EPContext models
# (epcontext.py), named "onnxruntime-ep:<the EPContext node's source attribute>".
EP_PREFIX = "onnxruntime-ep:"
_EP_SOURCE = r"^[A-Za-z0-9_.-]{1,64}$"
# Such a blob names no device onnxgen could check: the provider checks its device (and its SDK
# version) itself when it loads the blob.
EP_DEVICE = "execution-provider"


def is_known_backend(name: str) -> bool:
    if name in KNOWN_BACKENDS:
        return True
    return name.startswith(EP_PREFIX) and re.match(_EP_SOURCE, name[len(EP_PREFIX):]) is not None

# Blob payload limits: anything larger is refused before it is read.
MAX_BLOB_BYTES = 4 << 30
MAX_EMBEDDED_BYTES = 64 << 20
_SCOPE_NAME = r"^[A-Za-z0-9_.:-]{1,128}$"
_SHA256 = r"^[0-9a-f]{64}$"


class ContextError(ValueError):
    """A manifest or blob that must not be used; the message says what is wrong."""


class ContextWarning(UserWarning):
    """A blob (or the whole manifest) was skipped and the original nodes run instead."""


SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://onnxgen.invalid/backend-context.schema.json",
    "title": "onnxgen backend-context manifest (model metadata_props key 'onnxgen.context.manifest')",
    "type": "object",
    "required": ["format", "version", "scopes"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "version": {"type": "integer", "minimum": 1,
                    "description": "format version; a reader refuses versions it does not know"},
        "scopes": {
            "type": "object",
            "propertyNames": {"pattern": _SCOPE_NAME},
            "additionalProperties": {"$ref": "#/$defs/scope"},
        },
    },
    "$defs": {
        "scope": {
            "type": "object",
            "required": ["inputs", "outputs", "nodes", "hash", "blobs"],
            "additionalProperties": False,
            "properties": {
                "inputs": {"type": "array", "items": {"type": "string"},
                           "description": "values the scope reads that it does not make (weights excluded)"},
                "outputs": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                            "description": "values the scope makes that the rest of the model reads"},
                "nodes": {"type": "integer", "minimum": 1, "description": "how many nodes carry the scope"},
                "hash": {"type": "string", "pattern": r"^sha256:[0-9a-f]{64}$",
                         "description": f"content hash ({HASH_SCHEME}) of the nodes, attributes, opsets, weights"},
                "blobs": {"type": "array", "items": {"$ref": "#/$defs/blob"}},
            },
        },
        "blob": {
            "type": "object",
            "required": ["backend", "backend_version", "format", "hardware", "sha256", "size"],
            "additionalProperties": False,
            "oneOf": [{"required": ["path"]}, {"required": ["data"]}],
            "properties": {
                "backend": {"type": "string", "minLength": 1},
                "backend_version": {"type": "string", "minLength": 1,
                                    "description": "exact version of the backend that made the blob"},
                "format": {"type": "string", "minLength": 1, "description": "openvino.compiled_model, "
                                                  "openvino.compiled_model.weightless (its weights read from the "
                                                  "model's external-data file named in options.weights), ort, "
                                                  "onnxgen.kernels.programs (compiled score programs: data), "
                                                  "onnxgen.kernels.library (native code), onnxruntime.epcontext"},
                "hardware": {
                    "type": "object",
                    "required": ["device"],
                    "additionalProperties": False,
                    "properties": {
                        "device": {"type": "string", "minLength": 1},
                        "arch": {"type": "string"},
                        "isa": {"type": "array", "items": {"type": "string", "pattern": r"^[a-z0-9_]+$"},
                                "uniqueItems": True},
                    },
                },
                "sha256": {"type": "string", "pattern": _SHA256},
                "size": {"type": "integer", "minimum": 0},
                "path": {"type": "string", "minLength": 1,
                         "description": "POSIX path relative to the model's folder, inside it"},
                "data": {"type": "string", "contentEncoding": "base64"},
                "native_code": {"type": "boolean", "default": False,
                                "description": "the payload holds machine code a loader would map (a shared "
                                               "library): used only when the caller opts in"},
                "options": {"type": "object", "description": "backend-specific settings the blob was made with (e.g. "
                                                           "the kernel library's sha256 and the score compiler "
                                                           "a programs blob was made for; the weights file, "
                                                           "relative to the model's folder, and the sha256 of "
                                                           "where each weight lies in it, that a weightless "
                                                           "OpenVINO blob reads)"},
            },
        },
    },
}


# --------------------------------------------------------------------------- the manifest


@dataclass
class Blob:
    backend: str
    backend_version: str
    format: str
    hardware: dict
    sha256: str
    size: int
    path: str | None = None
    data: str | None = None
    native_code: bool = False
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if not self.native_code:
            out.pop("native_code")
        if not self.options:
            out.pop("options")
        return out

    @property
    def where(self) -> str:
        return self.path if self.path is not None else f"embedded ({len(self.data or '')} base64 chars)"


@dataclass
class Scope:
    inputs: list[str]
    outputs: list[str]
    nodes: int
    hash: str
    blobs: list[Blob] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs, "nodes": self.nodes, "hash": self.hash,
                "blobs": [b.to_json() for b in self.blobs]}


@dataclass
class Manifest:
    scopes: dict[str, Scope] = field(default_factory=dict)
    version: int = VERSION

    def to_json(self) -> str:
        doc = {"format": FORMAT, "version": self.version,
               "scopes": {name: scope.to_json() for name, scope in self.scopes.items()}}
        return json.dumps(doc, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate against ``SCHEMA`` and the version; ContextError says what is wrong."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as error:
            raise ContextError(f"the manifest is not JSON: {error}") from None
        validate_schema(doc)
        if doc["version"] != VERSION:
            raise ContextError(f"manifest version {doc['version']} is not supported (this reader knows {VERSION})")
        scopes = {}
        for name, s in doc["scopes"].items():
            scopes[name] = Scope(list(s["inputs"]), list(s["outputs"]), s["nodes"], s["hash"],
                                 [Blob(**b) for b in s["blobs"]])
        return cls(scopes, doc["version"])


def validate_schema(doc) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise ContextError(f"the manifest does not match the schema at {where}: {e.message}"
                           + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


def read_manifest(model: onnx.ModelProto) -> Manifest | None:
    """The model's manifest, or None when it has none; ContextError when it is invalid."""
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return Manifest.from_json(prop.value)
    return None


def write_manifest(model: onnx.ModelProto, manifest: Manifest | None) -> None:
    """Set (or with None remove) the manifest entry of ``model`` in place."""
    keep = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if manifest is not None:
        model.metadata_props.add(key=MANIFEST_KEY, value=manifest.to_json())


# --------------------------------------------------------------------------- scopes on nodes


def scope_of(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            return prop.value
    return None


def set_scope(node: onnx.NodeProto, name: str | None) -> None:
    keep = [p for p in node.metadata_props if p.key != SCOPE_KEY]
    del node.metadata_props[:]
    node.metadata_props.extend(keep)
    if name is not None:
        if not re.match(_SCOPE_NAME, name):
            raise ContextError(f"scope name {name!r} must match {_SCOPE_NAME}")
        node.metadata_props.add(key=SCOPE_KEY, value=name)


def scope_nodes(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Nodes of the main graph per scope, in graph order."""
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        name = scope_of(node)
        if name is not None:
            groups.setdefault(name, []).append(node)
    return groups


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every value ``node`` reads: its inputs and the outer values its subgraphs capture."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names.extend(_captured(graph))
    return names


def _captured(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    out = []
    for node in graph.node:
        out.extend(n for n in node_inputs(node) if n not in local)
        local.update(node.output)
    return out


class GraphIndex:
    """What ``boundary`` and ``is_convex`` read of the whole main graph (every node's inputs, each
    value's readers), computed once for many scopes: without it each call walks the whole graph
    (and every subgraph attribute in it), which makes checking one scope per layer quadratic."""

    def __init__(self, model: onnx.ModelProto):
        self.graph_inputs = {i.name for i in model.graph.input}
        self.initializers = {t.name for t in model.graph.initializer}
        self.graph_outputs = {o.name for o in model.graph.output}
        self.reads: dict[int, list[str]] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            names = self.reads[id(node)] = node_inputs(node)
            for name in dict.fromkeys(names):
                self.consumers.setdefault(name, []).append(node)

    def inputs_of(self, node: onnx.NodeProto) -> list[str]:
        found = self.reads.get(id(node))
        return found if found is not None else node_inputs(node)


def boundary(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
             index: GraphIndex | None = None) -> tuple[list[str], list[str], list[str]]:
    """(inputs, outputs, weights) of a group of main-graph nodes.

    inputs: values read and not made inside (initializers excluded, unless they are also graph
    inputs a caller may feed), in order of first use; outputs: values made inside that another
    node or the graph's outputs read, in order of making; weights: initializers read, sorted.
    ``index``: the model's ``GraphIndex`` (made here when not given).
    """
    index = index or GraphIndex(model)
    inside = {id(n) for n in nodes}
    made = {o for n in nodes for o in n.output if o}
    inputs, weights = [], set()
    for node in nodes:
        for name in index.inputs_of(node):
            if name in made:
                continue
            if name in index.initializers and name not in index.graph_inputs:
                weights.add(name)
            elif name not in inputs:
                inputs.append(name)
    outputs = [o for n in nodes for o in n.output
               if o and (o in index.graph_outputs or any(id(c) not in inside for c in index.consumers.get(o, ())))]
    return inputs, outputs, sorted(weights)


def is_convex(model: onnx.ModelProto, nodes: list[onnx.NodeProto], index: GraphIndex | None = None) -> bool:
    """Whether no path leaves the group and comes back (the group can run as one step)."""
    consumers = (index or GraphIndex(model)).consumers
    inside = {id(n) for n in nodes}
    frontier = [c for n in nodes for o in n.output for c in consumers.get(o, []) if id(c) not in inside]
    seen = set()
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for o in node.output:
            for c in consumers.get(o, []):
                if id(c) in inside:
                    return False
                frontier.append(c)
    return True


# --------------------------------------------------------------------------- the content hash


def content_hash(model: onnx.ModelProto, nodes: list[onnx.NodeProto], base_dir: str | os.PathLike = "",
                 index: GraphIndex | None = None) -> str:
    """``sha256:<hex>`` of a group of nodes, canonically (``HASH_SCHEME``).

    Fed into sha256, each field length-prefixed: the scheme name; per node in graph order its
    domain, op type, the opset version of its domain, its inputs and outputs (names), and its
    attributes sorted by name (floats as float32, ints as int64 little-endian, tensors as type,
    dims and little-endian values, graphs recursively); then each weight the nodes read, sorted
    by name: name, type, dims and values.  Node names and metadata are left out: renaming a node
    or annotating it does not change the hash; changing an attribute, a weight value, an opset or
    the wiring does.
    """
    h = hashlib.sha256()
    _put(h, HASH_SCHEME.encode())
    opsets = {o.domain or "": o.version for o in model.opset_import}
    _hash_nodes(h, nodes, opsets)
    initializers = {t.name: t for t in model.graph.initializer}
    _, _, weights = boundary(model, nodes, index)
    for name in weights:
        _hash_tensor(h, initializers[name], base_dir)
    return "sha256:" + h.hexdigest()


def external_files(model: onnx.ModelProto, nodes: list[onnx.NodeProto], base_dir, index=None) -> list[Path]:
    """The external-data files holding the weights ``nodes`` read."""
    initializers = {t.name: t for t in model.graph.initializer}
    files = set()
    for name in boundary(model, nodes, index)[2]:
        tensor = initializers[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(Path(base_dir) / entry.value)
    return sorted(files)


def cached_content_hash(model, name: str, nodes, base_dir, cache=None, model_identity: list | None = None,
                        index: GraphIndex | None = None) -> str:
    """``content_hash``, through ``cache`` (a ``cache.HashCache``) when given with the identity of
    the model file: keyed by that identity, the scope's name and the identities of the external
    data files the scope reads."""
    if cache is None or model_identity is None:
        return content_hash(model, nodes, base_dir, index)
    started = time.time_ns()
    files = external_files(model, nodes, base_dir, index)
    before = [file_identity(f) for f in files]
    key = cache.key("scope", HASH_SCHEME, model_identity, name, before)
    known = cache.get(key)
    if known is not None:
        return known
    value = content_hash(model, nodes, base_dir, index)
    if [file_identity(f) for f in files] == before:
        cache.put(key, value, [model_identity] + before, started)
    return value


def _put(h, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _hash_nodes(h, nodes, opsets) -> None:
    _put(h, struct.pack("<Q", len(nodes)))
    for node in nodes:
        domain = "" if node.domain == "ai.onnx" else node.domain
        for text in (domain, node.op_type, str(opsets.get(domain, 0)), node.overload):
            _put(h, text.encode())
        for names in (node.input, node.output):
            _put(h, struct.pack("<Q", len(names)))
            for name in names:
                _put(h, name.encode())
        attrs = sorted(node.attribute, key=lambda a: a.name)
        _put(h, struct.pack("<Q", len(attrs)))
        for attr in attrs:
            _hash_attribute(h, attr, opsets)


def _hash_attribute(h, attr: onnx.AttributeProto, opsets) -> None:
    A = onnx.AttributeProto
    _put(h, attr.name.encode())
    _put(h, struct.pack("<i", attr.type))
    _put(h, attr.ref_attr_name.encode())
    if attr.type == A.FLOAT:
        _put(h, struct.pack("<f", attr.f))
    elif attr.type == A.INT:
        _put(h, struct.pack("<q", attr.i))
    elif attr.type == A.STRING:
        _put(h, attr.s)
    elif attr.type == A.TENSOR:
        _hash_tensor(h, attr.t, "")
    elif attr.type == A.GRAPH:
        _hash_graph(h, attr.g, opsets)
    elif attr.type == A.FLOATS:
        _put(h, struct.pack(f"<{len(attr.floats)}f", *attr.floats))
    elif attr.type == A.INTS:
        _put(h, struct.pack(f"<{len(attr.ints)}q", *attr.ints))
    elif attr.type == A.STRINGS:
        _put(h, struct.pack("<Q", len(attr.strings)))
        for s in attr.strings:
            _put(h, s)
    elif attr.type == A.TENSORS:
        _put(h, struct.pack("<Q", len(attr.tensors)))
        for t in attr.tensors:
            _hash_tensor(h, t, "")
    elif attr.type == A.GRAPHS:
        _put(h, struct.pack("<Q", len(attr.graphs)))
        for g in attr.graphs:
            _hash_graph(h, g, opsets)
    elif attr.type in (A.TYPE_PROTO, A.SPARSE_TENSOR, A.TYPE_PROTOS, A.SPARSE_TENSORS):
        _put(h, attr.SerializeToString(deterministic=True))
    else:
        raise ContextError(f"cannot hash attribute {attr.name!r} of type {attr.type}")


def _hash_graph(h, graph: onnx.GraphProto, opsets) -> None:
    for values in (graph.input, graph.output):
        _put(h, struct.pack("<Q", len(values)))
        for v in values:
            _put(h, v.name.encode())
    _hash_nodes(h, list(graph.node), opsets)
    for t in sorted(graph.initializer, key=lambda t: t.name):
        _hash_tensor(h, t, "")


def _hash_tensor(h, tensor: onnx.TensorProto, base_dir) -> None:
    array = numpy_helper.to_array(tensor, base_dir=str(base_dir))
    _put(h, tensor.name.encode())
    _put(h, struct.pack("<i", tensor.data_type))
    _put(h, struct.pack(f"<{array.ndim}q", *array.shape))
    data = array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.byteorder == ">" else array
    h.update(struct.pack("<Q", data.nbytes))
    h.update(memoryview(data.reshape(-1).view("u1")) if data.dtype != object else repr(data.tolist()).encode())


# --------------------------------------------------------------------------- blob payloads


def safe_blob_path(model_dir: str | os.PathLike, relative: str) -> Path:
    """Resolve a blob path, refusing anything that could leave the model's folder."""
    if not relative or "\\" in relative or "\x00" in relative or re.match(r"^[A-Za-z]:", relative):
        raise ContextError(f"blob path {relative!r}: only plain POSIX paths relative to the model's folder")
    pure = PurePosixPath(relative)
    if pure.is_absolute():
        raise ContextError(f"blob path {relative!r} is absolute: blobs must lie in the model's folder")
    if any(part == ".." for part in pure.parts):
        raise ContextError(f"blob path {relative!r} climbs out with '..': blobs must lie in the model's folder")
    root = Path(model_dir).resolve()
    target = (root / Path(*pure.parts)).resolve()  # follows symlinks, every one of them
    if target != root and root not in target.parents:
        raise ContextError(f"blob path {relative!r} leads out of the model's folder (through a symlink) "
                           f"to {target}")
    return target


def read_payload(blob: Blob, model_dir: str | os.PathLike, *, max_bytes: int = MAX_BLOB_BYTES,
                 cache=None) -> bytes:
    """The blob's bytes, after every check: size limit, path confinement, size, sha256.  With a
    ``cache.HashCache``, a blob file whose identity (path, inode, size, times) is unchanged since its
    sha256 was computed is not hashed again; any change to the file means hashing it again."""
    if blob.size > max_bytes:
        raise ContextError(f"blob of {blob.size} bytes is over the limit of {max_bytes} bytes")
    digest = None
    if blob.data is not None:
        if blob.size > MAX_EMBEDDED_BYTES:
            raise ContextError(f"embedded blob of {blob.size} bytes is over the limit of {MAX_EMBEDDED_BYTES}")
        if len(blob.data) > 4 * ((min(blob.size, max_bytes) + 2) // 3) + 4:
            raise ContextError("embedded payload is longer than its declared size")
        try:
            payload = base64.b64decode(blob.data, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ContextError(f"embedded payload is not valid base64: {error}") from None
    else:
        path = safe_blob_path(model_dir, blob.path)
        if not path.is_file():
            raise ContextError(f"blob file {blob.path!r} is missing (looked for {path})")
        actual = path.stat().st_size
        if actual != blob.size:
            raise ContextError(f"blob file {blob.path!r} has {actual} bytes, the manifest says {blob.size}")
        started = time.time_ns()
        before = file_identity(path) if cache is not None else None
        payload = path.read_bytes()
        if before is not None and len(payload) == blob.size and file_identity(path) == before:
            key = cache.key("blob", before)
            digest = cache.get(key)
            if digest is None:
                digest = hashlib.sha256(payload).hexdigest()
                cache.put(key, digest, [before], started)
    if len(payload) != blob.size:
        raise ContextError(f"blob payload has {len(payload)} bytes, the manifest says {blob.size} (truncated?)")
    digest = digest or hashlib.sha256(payload).hexdigest()
    if digest != blob.sha256:
        raise ContextError(f"blob sha256 is {digest}, the manifest says {blob.sha256}: the payload was changed")
    return payload


def weights_file_problem(blob: Blob, model_dir: str | os.PathLike) -> None:
    """ContextError when a blob that reads the model's weights file (``options.weights.path``: a
    weightless OpenVINO blob) names one outside the model's folder or one that is missing.  Where
    the weights lie in it is checked at load, against the scope's graph."""
    weights = blob.options.get("weights") if isinstance(blob.options, dict) else None
    if not isinstance(weights, dict) or "path" not in weights:
        return
    if not isinstance(weights["path"], str) or not safe_blob_path(model_dir, weights["path"]).is_file():
        raise ContextError(f"the weights file {weights['path']!r} the blob reads is missing")


def make_blob(payload: bytes, *, backend: str, backend_version: str, format: str, hardware: dict,
              path: str | None = None, native_code: bool = False, options: dict | None = None) -> Blob:
    """A Blob for ``payload``: embedded when ``path`` is None, else to be written at ``path``."""
    data = base64.b64encode(payload).decode() if path is None else None
    return Blob(backend, backend_version, format, hardware, hashlib.sha256(payload).hexdigest(), len(payload),
                path=path, data=data, native_code=native_code, options=options or {})


# --------------------------------------------------------------------------- this machine


def cpu_flags() -> set[str]:
    """ISA extensions of this CPU (Linux: /proc/cpuinfo; elsewhere: none known)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The extensions a CPU backend may pick kernels for at compile time: a blob records those its
# build machine had, and is used only where all of them are present (conservative).
RELEVANT_ISA = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_hardware(device: str = "cpu") -> dict:
    flags = cpu_flags()
    return {"device": device, "arch": platform.machine(), "isa": [f for f in RELEVANT_ISA if f in flags]}


def hardware_problem(hardware: dict) -> str | None:
    """Why this machine does not meet ``hardware``, or None when it does."""
    device = hardware.get("device", "")
    if device == EP_DEVICE:
        return None  # the execution provider checks its own device when it loads the blob
    if device.lower() != "cpu":
        return f"device {device!r} (only the CPU is supported here)"
    arch = hardware.get("arch")
    if arch and arch != platform.machine():
        return f"architecture {arch} (this machine: {platform.machine()})"
    missing = sorted(set(hardware.get("isa", [])) - cpu_flags())
    if missing:
        return f"ISA extensions missing on this CPU: {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------- the checker


@dataclass
class BlobStatus:
    scope: str
    index: int
    blob: Blob
    error: str | None = None  # a fault of the file: the blob is unusable anywhere
    usable_here: str | None = None  # None when usable on this machine, else why not

    @property
    def ok(self) -> bool:
        return self.error is None and self.usable_here is None


@dataclass
class Report:
    """What ``check`` found: ``errors`` (the file is wrong), per-blob status, and notes."""

    path: str
    manifest: Manifest | None
    errors: list[str] = field(default_factory=list)
    blobs: list[BlobStatus] = field(default_factory=list)
    scope_errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and not any(b.error for b in self.blobs)

    def problems(self) -> list[str]:
        return self.errors + [f"scope {b.scope!r} blob {b.index} ({b.blob.backend}): {b.error}"
                              for b in self.blobs if b.error]

    def raise_for_errors(self) -> None:
        if not self.ok:
            raise ContextError(f"{self.path}: " + "; ".join(self.problems()))


def load_model(model_path: str | os.PathLike) -> onnx.ModelProto:
    """The model without its external data (tensors keep their references; see ``content_hash``)."""
    return onnx.load(str(model_path), load_external_data=False)


def check(model_path: str | os.PathLike, *, verify_payloads: bool = True, max_blob_bytes: int = MAX_BLOB_BYTES,
          model: onnx.ModelProto | None = None) -> Report:
    """Validate a model's backend context: schema, version, scopes against the graph (nodes,
    boundaries, content hash, convexity), every blob (known backend, confined path, size,
    sha256), and whether this machine could use each blob (backend installed at the same
    version, hardware).  ``Report.ok`` is False when anything is wrong with the file; blobs this
    machine cannot use are reported in ``usable_here``, not as errors."""
    from .backends import backend_problem

    model_path = Path(model_path)
    model = model if model is not None else load_model(model_path)
    base_dir = model_path.parent
    report = Report(str(model_path), None)
    try:
        manifest = read_manifest(model)
    except ContextError as error:
        report.errors.append(str(error))
        return report
    report.manifest = manifest
    groups = scope_nodes(model)
    graph_index = GraphIndex(model)
    if manifest is None:
        if groups:
            report.errors.append(f"nodes carry scopes {sorted(groups)} but the model has no manifest")
        return report
    for name in sorted(set(groups) - set(manifest.scopes)):
        report.errors.append(f"scope {name!r}: {len(groups[name])} nodes carry it but the manifest does not list it")
    for name, scope in manifest.scopes.items():
        problem = scope_problem(model, name, scope, groups.get(name, []), base_dir, index=graph_index)
        if problem:
            report.scope_errors[name] = problem
            report.errors.append(f"scope {name!r}: {problem}")
        for index, blob in enumerate(scope.blobs):
            status = BlobStatus(name, index, blob)
            report.blobs.append(status)
            if not is_known_backend(blob.backend):
                status.error = (f"unknown backend {blob.backend!r} (known: {', '.join(KNOWN_BACKENDS)}, "
                                f"{EP_PREFIX}<provider>)")
                continue
            try:
                if verify_payloads:
                    read_payload(blob, base_dir, max_bytes=max_blob_bytes)
                elif blob.path is not None:
                    safe_blob_path(base_dir, blob.path)
                weights_file_problem(blob, base_dir)
            except (ContextError, OSError) as error:
                status.error = str(error)
                continue
            status.usable_here = backend_problem(blob) or hardware_problem(blob.hardware)
    return report


def scope_problem(model, name: str, scope: Scope, nodes: list, base_dir, *, cache=None,
                  model_identity: list | None = None, index: GraphIndex | None = None) -> str | None:
    """Why the manifest's entry for scope ``name`` does not describe the graph, or None.  With a
    ``cache.HashCache`` and the identity of the file ``model`` was read from (unchanged while it
    was read), a content hash computed before from the same files is taken from the cache."""
    if not nodes:
        return "no node carries it"
    if len(nodes) != scope.nodes:
        return f"{len(nodes)} nodes carry it, the manifest says {scope.nodes}"
    index = index or GraphIndex(model)
    inputs, outputs, _ = boundary(model, nodes, index)
    if (inputs, outputs) != (scope.inputs, scope.outputs):
        return f"boundary is inputs={inputs} outputs={outputs}, the manifest says inputs={scope.inputs} " \
               f"outputs={scope.outputs}"
    if not is_convex(model, nodes, index):
        return "not convex: a path leaves the scope and comes back"
    try:
        actual = cached_content_hash(model, name, nodes, base_dir, cache, model_identity, index)
    except (OSError, ValueError) as error:
        return f"cannot hash: {error}"
    if actual != scope.hash:
        return f"content hash is {actual}, the manifest says {scope.hash}: the nodes or weights changed"
    return None
