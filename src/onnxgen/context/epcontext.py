"""Importing onnxruntime EPContext models: ``import_epcontext(source, epctx, out)``.

An EPContext model (what onnxruntime writes with ``ep.context_enable=1`` or its compile API)
replaces each partition an execution provider compiled by one ``com.microsoft.EPContext`` node;
the partition's nodes, and the weights only they read, are gone from that file.  The importer
takes that model *and the source model it was made from*, and for each EPContext node:

1. finds the source nodes it replaced: walking back from the node's outputs through their makers
   until the node's inputs (or weights) are reached; the group must read exactly the node's
   (non-weight) inputs, every value the rest of the source reads from it must be among the node's
   outputs, the group must be convex, and no node may belong to two partitions;
2. marks those nodes as a scope (``onnxgen.context.scope``), with its boundary and content hash,
   or reuses a scope of the source's own context that covers exactly the same nodes;
3. stores the node's payload (``ep_cache_context``: the bytes with ``embed_mode=1``, else a file
   relative to the EPContext model's folder, confined to it) as a blob of backend
   ``onnxruntime-ep:<source attribute>`` at version ``ep_sdk_version``, format
   ``onnxruntime.epcontext``, with the node's other attributes and its exact input/output lists in
   the blob's ``options``, so the node can be rebuilt when that execution provider is present.

A partition that shares another node's context (``main_context=0``, as QNN writes for several
graphs in one context binary) gets the main node's payload (the same file), marked
``main_context: 0``; the loader does not run such blobs alone (they fall back, with a warning).

The written model is the source graph, unchanged, plus the context: it runs everywhere (the
original nodes where the provider is missing), and ``strip`` gives the source graph back.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .format import (_EP_SOURCE, EP_DEVICE, EP_PREFIX, MAX_BLOB_BYTES, ContextError, Manifest, Scope, boundary,
                     content_hash, is_convex, load_model, make_blob, node_inputs, read_manifest, safe_blob_path,
                     scope_nodes, scope_of, set_scope, write_manifest)

EP_DOMAIN = "com.microsoft"
EP_OP = "EPContext"
EP_FORMAT = "onnxruntime.epcontext"
# EPContext attributes kept in the blob's options (besides the payload and embed_mode, which the
# importer replaces, and source / ep_sdk_version, which become backend / backend_version).
_KEPT = ("main_context", "partition_name", "notes", "hardware_architecture", "onnx_model_filename", "max_size")


@dataclass
class EPNode:
    """One ``com.microsoft.EPContext`` node, its attributes parsed (defaults as onnxruntime's schema)."""

    name: str
    inputs: list[str]
    outputs: list[str]
    source: str
    ep_sdk_version: str | None
    embed_mode: int
    main_context: int
    cache_context: bytes
    attributes: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, node: onnx.NodeProto, index: int) -> EPNode:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        label = node.name or f"#{index}"
        source = attrs.get("source", b"").decode("utf-8", "replace")
        if not source:
            raise ContextError(f"EPContext node {label!r} has no 'source' attribute: which execution provider "
                               "made it is unknown")
        if not re.match(_EP_SOURCE, source):
            raise ContextError(f"EPContext node {label!r}: source {source!r} is not a plain provider name")
        embed = int(attrs.get("embed_mode", 1))
        if embed not in (0, 1):
            raise ContextError(f"EPContext node {label!r}: embed_mode {embed} (only 0 and 1 are defined)")
        kept = {}
        for key in _KEPT:
            if key in attrs:
                value = attrs[key]
                kept[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        version = attrs.get("ep_sdk_version")
        return cls(label, [n for n in node.input], [n for n in node.output], source,
                   version.decode("utf-8", "replace") if version else None, embed,
                   int(attrs.get("main_context", 1)), attrs.get("ep_cache_context", b""), kept)

    @property
    def backend(self) -> str:
        return EP_PREFIX + self.source


@dataclass
class Imported:
    """One imported partition: the EPContext node, the scope it became, the blob."""

    node: str
    scope: str
    nodes: int
    backend: str
    backend_version: str
    size: int
    where: str
    reused_scope: bool = False


def epcontext_nodes(model: onnx.ModelProto) -> list[EPNode]:
    return [EPNode.parse(n, i) for i, n in enumerate(model.graph.node)
            if n.op_type == EP_OP and n.domain == EP_DOMAIN]


def match_partition(source: onnx.ModelProto, ep: EPNode) -> list[onnx.NodeProto]:
    """The source nodes an EPContext node stands for (see the module docstring), in graph order;
    ContextError when they cannot be found exactly."""
    graph = source.graph
    maker = {o: node for node in graph.node for o in node.output if o}
    graph_inputs = {i.name for i in graph.input}
    weights = {t.name for t in graph.initializer if t.name not in graph_inputs}
    stop = {n for n in ep.inputs if n}
    for name in ep.outputs:
        if name and name not in maker:
            raise ContextError(f"EPContext node {ep.name!r}: its output {name!r} is made by no node of the source "
                               "model (was the EPContext model made from another model?)")
    found, seen, stack = {}, set(), [o for o in ep.outputs if o]
    while stack:
        value = stack.pop()
        if value in stop or value in seen:
            continue
        seen.add(value)
        node = maker.get(value)
        if node is None:
            if value in weights:
                continue  # a weight the partition reads: now inside the payload
            raise ContextError(f"EPContext node {ep.name!r}: the nodes making its outputs read {value!r}, which is "
                               "not among the node's inputs")
        if id(node) not in found:
            found[id(node)] = node
            stack.extend(node_inputs(node))
    group = [n for n in graph.node if id(n) in found]
    inputs, outputs, _ = boundary(source, group)
    expected = [n for n in ep.inputs if n and n not in weights]
    if set(inputs) != set(expected):
        raise ContextError(f"EPContext node {ep.name!r}: the source nodes that make its outputs read {inputs}, the "
                           f"node reads {expected}")
    missing = [o for o in outputs if o not in ep.outputs]
    if missing:
        raise ContextError(f"EPContext node {ep.name!r}: the rest of the source model reads {missing} from its "
                           "partition, which the node does not output")
    if not is_convex(source, group):
        raise ContextError(f"EPContext node {ep.name!r}: its partition is not convex in the source model")
    return group


def _payload(ep: EPNode, epctx_dir: Path, max_bytes: int) -> bytes:
    if ep.embed_mode == 1:
        payload = ep.cache_context
    else:
        relative = ep.cache_context.decode("utf-8", "replace")
        path = safe_blob_path(epctx_dir, relative)  # the same confinement as this format's own blobs
        if not path.is_file():
            raise ContextError(f"EPContext node {ep.name!r}: its context file {relative!r} is missing (looked for "
                               f"{path})")
        if path.stat().st_size > max_bytes:
            raise ContextError(f"EPContext node {ep.name!r}: context file of {path.stat().st_size} bytes is over the "
                               f"limit of {max_bytes} bytes")
        payload = path.read_bytes()
    if not payload:
        raise ContextError(f"EPContext node {ep.name!r}: empty ep_cache_context")
    if len(payload) > max_bytes:
        raise ContextError(f"EPContext node {ep.name!r}: payload of {len(payload)} bytes is over the limit of "
                           f"{max_bytes} bytes")
    return payload


def _scope_name(ep: EPNode, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.:-]", "_", ep.attributes.get("partition_name") or ep.name)[:100] or "epcontext"
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def import_epcontext(source_path: str | os.PathLike, epctx_path: str | os.PathLike,
                     out_path: str | os.PathLike, *, embed: bool = False,
                     max_blob_bytes: int = MAX_BLOB_BYTES) -> list[Imported]:
    """Write ``out_path``: the source model with a scope per EPContext node of ``epctx_path`` and
    that node's payload as a blob (files in ``<out>.context/``, or base64 in the manifest with
    ``embed``).  A context the source already has is kept; a partition covering exactly one of its
    scopes adds a blob to it.  ContextError when a node cannot be matched or its payload is unsafe;
    nothing is written then."""
    from .tools import save

    source_path, epctx_path, out_path = Path(source_path), Path(epctx_path), Path(out_path)
    source = load_model(source_path)
    epctx = onnx.load(str(epctx_path), load_external_data=False)
    eps = epcontext_nodes(epctx)
    if not eps:
        raise ContextError(f"{epctx_path} has no {EP_DOMAIN}.{EP_OP} node")
    if [o.name for o in epctx.graph.output] != [o.name for o in source.graph.output]:
        raise ContextError(f"{epctx_path} has outputs {[o.name for o in epctx.graph.output]}, the source has "
                           f"{[o.name for o in source.graph.output]}: not made from this source model")
    manifest = read_manifest(source) or Manifest()
    existing = scope_nodes(source)
    groups, owner = [], {}
    for ep in eps:
        group = match_partition(source, ep)
        for node in group:
            if id(node) in owner:
                raise ContextError(f"EPContext nodes {owner[id(node)]!r} and {ep.name!r} both stand for source node "
                                   f"{node.name or node.op_type!r}")
            owner[id(node)] = ep.name
        groups.append(group)
    mains = {}
    for ep in eps:
        if ep.main_context == 1:
            mains.setdefault(ep.source, []).append(ep)

    payloads: dict[int, bytes] = {}
    for ep in eps:
        if ep.main_context == 1:
            payloads[id(ep)] = _payload(ep, epctx_path.parent, max_blob_bytes)
    plan = []  # (ep, group, payload, scope name, reused): everything checked before anything is written
    taken = set(manifest.scopes) | set(existing)
    for ep, group in zip(eps, groups):
        if ep.main_context == 1:
            payload = payloads[id(ep)]
        else:
            candidates = mains.get(ep.source, [])
            if len(candidates) != 1:
                raise ContextError(f"EPContext node {ep.name!r} shares a context (main_context=0), and the model has "
                                   f"{len(candidates)} main context nodes of {ep.source}")
            payload = payloads[id(candidates[0])]
        carried = {scope_of(n) for n in group}
        if carried == {None}:
            name, reused = _scope_name(ep, taken), False
            taken.add(name)
        elif len(carried) == 1 and len(existing[next(iter(carried))]) == len(group):
            name, reused = next(iter(carried)), True
        else:
            raise ContextError(f"EPContext node {ep.name!r}: its partition overlaps the source's scopes "
                               f"{sorted(s for s in carried if s)} without matching one of them")
        plan.append((ep, group, payload, name, reused))

    blob_dir = out_path.parent / (out_path.stem + ".context")
    written: dict[str, str] = {}  # payload sha256 -> relative path (a shared context is written once)
    base_dir = source_path.parent
    results = []
    for ep, group, payload, name, reused in plan:
        if not reused:
            for node in group:
                set_scope(node, name)
            inputs, outputs, _ = boundary(source, group)
            manifest.scopes[name] = Scope(inputs, outputs, len(group), content_hash(source, group, base_dir))
        digest = hashlib.sha256(payload).hexdigest()
        relative = None
        if not embed:
            relative = written.get(digest)
            if relative is None:
                blob_dir.mkdir(parents=True, exist_ok=True)
                file = blob_dir / f"{name}.{ep.source}.bin"
                file.write_bytes(payload)
                relative = written[digest] = file.relative_to(out_path.parent).as_posix()
        options = {"source": ep.source, "node_name": ep.name, "inputs": ep.inputs, "outputs": ep.outputs,
                   "embed_mode": ep.embed_mode, **ep.attributes,
                   "opsets": {o.domain or "": o.version for o in epctx.opset_import}, "ir_version": epctx.ir_version}
        options.setdefault("main_context", 1)
        blob = make_blob(payload, backend=ep.backend, backend_version=ep.ep_sdk_version or "unspecified",
                         format=EP_FORMAT, hardware={"device": EP_DEVICE}, path=relative, options=options)
        scope = manifest.scopes[name]
        scope.blobs = [b for b in scope.blobs if not (b.backend == blob.backend
                                                      and b.backend_version == blob.backend_version)]
        scope.blobs.append(blob)
        results.append(Imported(ep.name, name, len(group), blob.backend, blob.backend_version, len(payload),
                                relative or "embedded", reused))
    write_manifest(source, manifest)
    save(source, source_path, out_path)
    return results
