"""Making and undoing a backend context: ``annotate`` (scopes), ``compile`` (blobs), ``inspect``
(a table), ``strip`` (back to the plain model)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from .backends import BACKENDS
from .format import (MANIFEST_KEY, ContextError, Manifest, Scope, boundary, check, content_hash, is_convex,
                     load_model, make_blob, node_inputs, read_manifest, scope_nodes, set_scope, write_manifest)
from .partition import submodel, value_types


def save(model: onnx.ModelProto, source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Save ``model`` (loaded without its external data from ``source``) to ``out``.  In the same
    folder the external data references stay as they are; elsewhere the weights are copied into
    ``<out>.data``."""
    source, out = Path(source), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    if not external or out.parent.resolve() == source.parent.resolve():
        onnx.save_model(model, str(out))
    else:
        onnx.load_external_data_for_model(model, str(source.parent))
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
    return out


def convex_groups(model: onnx.ModelProto, selected: Callable[[onnx.NodeProto], bool]) -> list[list[onnx.NodeProto]]:
    """The largest groups of selected nodes that are connected and convex.

    Each node gets a rank: the most unselected nodes on any path into it.  Selected nodes of one
    rank have no path between them through an unselected node, so each connected component of
    one rank is convex, and no two of them depend on each other in a cycle.
    """
    maker, rank = {}, {}
    for node in model.graph.node:
        r = 0
        for name in node_inputs(node):
            p = maker.get(name)
            if p is not None:
                r = max(r, rank[id(p)] + (0 if selected(p) else 1))
        rank[id(node)] = r
        for o in node.output:
            maker[o] = node
    chosen = [n for n in model.graph.node if selected(n)]
    parent = {id(n): id(n) for n in chosen}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for node in chosen:
        for name in node_inputs(node):
            p = maker.get(name)
            if p is not None and id(p) in parent and rank[id(p)] == rank[id(node)]:
                parent[find(id(p))] = find(id(node))
    groups: dict[int, list] = {}
    for node in chosen:
        groups.setdefault(find(id(node)), []).append(node)
    return list(groups.values())


def annotate(model_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
             op_types: Sequence[str] | None = None, nodes: Mapping[str, Sequence[str]] | None = None,
             backend: str | None = None, prefix: str = "scope", min_nodes: int | None = None) -> dict[str, Scope]:
    """Mark scopes and write a manifest without blobs (replacing any earlier context).

    ``op_types``: the largest convex groups of nodes of those types; ``nodes``: scope name ->
    node names (each group must be convex); ``backend``: the largest convex groups of nodes the
    backend supports.  Groups under ``min_nodes`` nodes are left out (default: 2 for ``backend``,
    where lone reshapes are not worth a blob, but 1 for onnxgen-kernels, where one attention or
    MoE node is; 1 otherwise).
    """
    if min_nodes is None:
        min_nodes = getattr(BACKENDS.get(backend), "min_nodes", 2) if backend is not None else 1
    model = load_model(model_path)
    strip_model(model)
    if sum(x is not None for x in (op_types, nodes, backend)) != 1:
        raise ValueError("annotate: give exactly one of op_types, nodes or backend")
    named: dict[str, list] = {}
    if nodes is not None:
        by_name = {n.name: n for n in model.graph.node if n.name}
        for scope, names in nodes.items():
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ValueError(f"scope {scope!r}: no nodes named {missing}")
            group = [n for n in model.graph.node if n.name in set(names)]
            if not is_convex(model, group):
                raise ValueError(f"scope {scope!r} is not convex: a path leaves it and comes back")
            named[scope] = group
    else:
        if op_types is not None:
            wanted = set(op_types)
            selected = lambda n: n.op_type in wanted  # noqa: E731
        else:
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
            selected = BACKENDS[backend].supports
        groups = [g for g in convex_groups(model, selected) if len(g) >= min_nodes]
        for i, group in enumerate(groups):
            label = re.sub(r"[^A-Za-z0-9_.:-]", "_", op_types[0] if op_types and len(op_types) == 1 else prefix)
            named[f"{label}_{i}"] = group
    base_dir = Path(model_path).parent
    manifest = Manifest()
    for scope, group in named.items():
        inputs, outputs, _ = boundary(model, group)
        if not outputs:
            continue  # nothing of it is read: nothing to compile
        for node in group:
            set_scope(node, scope)
        manifest.scopes[scope] = Scope(inputs, outputs, len(group), content_hash(model, group, base_dir))
    write_manifest(model, manifest)
    save(model, model_path, out_path or model_path)
    return manifest.scopes


@dataclass
class Compiled:
    scope: str
    backend: str
    seconds: float
    size: int = 0
    error: str | None = None


def compile(model_path: str | os.PathLike, backend: str, out_path: str | os.PathLike | None = None, *,
            scopes: Sequence[str] | None = None, embed: bool = False, format: str | None = None) -> list[Compiled]:
    """Compile every scope (or ``scopes``) with ``backend`` and record the blobs; a blob of the same
    backend, version and format (or an alternative format: OpenVINO's weightless and full blobs)
    already there is replaced.  Blobs go to ``<model>.context/`` beside the written model, or into
    the manifest (base64) with ``embed``.  Scopes the backend cannot compile are reported and left
    without its blob.  ``format``: for a backend that makes several
    (onnxgen-kernels: ``onnxgen.kernels.programs`` or ``onnxgen.kernels.library``; default: the
    programs where the scope has score_mods or FlexAttention nodes to compile, else the library;
    openvino: ``openvino.compiled_model.weightless`` where the scope's weights lie in one external-data
    file, else ``openvino.compiled_model``, the compiled model with its weights)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    engine = BACKENDS[backend]
    formats = getattr(engine, "formats", (engine.format,))
    if format is not None and format not in formats:
        raise ValueError(f"{backend} makes {', '.join(formats)} blobs, not {format!r}")
    version = engine.version()
    if version is None:
        raise ValueError(f"{backend} is not installed")
    model_path = Path(model_path)
    out_path = Path(out_path or model_path)
    model = load_model(model_path)
    manifest = read_manifest(model)
    if manifest is None:
        raise ValueError(f"{model_path} has no backend context: run `onnxgen context annotate` first")
    report = check(model_path, verify_payloads=False, model=model)
    if report.scope_errors:
        raise ContextError("; ".join(f"scope {k!r}: {v}" for k, v in report.scope_errors.items()))
    if out_path.parent.resolve() != model_path.parent.resolve():
        # Written elsewhere, the weights get a file (and offsets) of their own: compile against the
        # written model, since a weightless blob reads its weights from the file beside it.
        save(model, model_path, out_path)
        model_path, model = out_path, load_model(out_path)
        manifest = read_manifest(model)
    groups = scope_nodes(model)
    types = value_types(model)
    results, dropped = [], []
    blob_dir = out_path.parent / (out_path.stem + ".context")
    for name, scope in manifest.scopes.items():
        if scopes is not None and name not in scopes:
            continue
        sub = submodel(model, groups[name], scope.inputs, scope.outputs, types, model_path.parent)
        external = submodel(model, groups[name], scope.inputs, scope.outputs, types, keep_external=True)
        start = time.perf_counter()
        try:
            payload, fields = engine.compile(sub, format=format, scope_hash=scope.hash, external=external,
                                             base_dir=model_path.parent)
        except Exception as error:  # noqa: BLE001 - one scope a backend cannot take is not fatal
            results.append(Compiled(name, backend, time.perf_counter() - start, error=str(error).splitlines()[0]))
            continue
        relative = None
        if not embed:
            blob_dir.mkdir(exist_ok=True)
            file = blob_dir / f"{name}.{backend}.{fields['format'].split('.')[-1]}"
            file.write_bytes(payload)
            relative = file.relative_to(out_path.parent).as_posix()
        blob = make_blob(payload, backend=backend, backend_version=version, path=relative, **fields)
        alternatives = getattr(engine, "alternatives", frozenset())  # formats that stand for one another
        replaced = [b for b in scope.blobs
                    if b.backend == backend and b.backend_version == version
                    and (b.format == blob.format or {b.format, blob.format} <= alternatives)]
        scope.blobs = [b for b in scope.blobs if b not in replaced] + [blob]
        dropped.extend(b.path for b in replaced if b.path and b.path != relative)
        results.append(Compiled(name, backend, time.perf_counter() - start, len(payload)))
    write_manifest(model, manifest)
    save(model, model_path, out_path)
    _remove_unused_blob_files(dropped, manifest, out_path.parent, blob_dir)
    return results


def _remove_unused_blob_files(paths, manifest: Manifest, model_dir: Path, blob_dir: Path) -> None:
    """Delete the files of replaced blobs (a weightless blob replacing a full one has another name)
    that no blob names any more, and only in the folder compile writes its blobs to."""
    named = {b.path for scope in manifest.scopes.values() for b in scope.blobs if b.path}
    for relative in set(paths) - named:
        file = model_dir / relative
        if file.is_file() and file.resolve().parent == blob_dir.resolve():
            file.unlink()


def strip_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove every scope mark and the manifest, in place."""
    for node in model.graph.node:
        set_scope(node, None)
    write_manifest(model, None)
    return model


def strip(model_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Write the plain model: the same graph with no scope marks and no manifest (blob files are
    left where they are)."""
    model = strip_model(load_model(model_path))
    return save(model, model_path, out_path or model_path)


def inspect(model_path: str | os.PathLike) -> str:
    """A table of scopes and blobs, with sizes and whether this machine can use each blob."""
    report = check(model_path)
    lines = [f"{model_path}: " + ("valid" if report.ok else "INVALID")]
    lines += [f"  error: {e}" for e in report.problems()]
    if report.manifest is None:
        lines.append("  no backend context" if MANIFEST_KEY else "")
        return "\n".join(lines)
    rows = [("scope", "nodes", "in", "out", "graph", "backend", "format", "size", "where", "here")]
    for name, scope in report.manifest.scopes.items():
        graph = "changed" if name in report.scope_errors else "ok"
        statuses = [b for b in report.blobs if b.scope == name]
        if not statuses:
            rows.append((name, str(scope.nodes), str(len(scope.inputs)), str(len(scope.outputs)), graph,
                         "-", "-", "-", "-", "original nodes"))
        for s in statuses:
            here = "usable" if s.ok and graph == "ok" else (s.error or s.usable_here or "scope changed")
            rows.append((name, str(scope.nodes), str(len(scope.inputs)), str(len(scope.outputs)), graph,
                         s.blob.backend, s.blob.format, _size(s.blob.size),
                         s.blob.path or "embedded", here[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
