"""``load(model_path, backends=...)``: run a model with its blobs where they are valid, its
original nodes everywhere else.

The plan: the manifest is read and validated (an invalid one is refused with a ContextWarning
saying why, and the whole original graph runs); each scope whose nodes still hash to the
manifest's hash gets the first of its blobs that is for a requested backend, installed at the
same version, on hardware that meets its requirements, confined to the model's folder, of the
declared size and sha256, and that loads.  Each scope with a blob is one step; all other nodes
(scopes without a usable blob included) are grouped into as few onnxruntime steps as the
dependencies allow, on onnxgen's kernels.  An onnxgen-kernels programs blob is not a step of its
own: its nodes (score programs compiled, FlexAttention rewritten) replace the scope's nodes in the
onnxruntime step that runs them, so the compiler is not run for them (programs.py).  A blob that
fails when it runs is replaced by its scope's original nodes for that run and every later one,
with a warning (programs the kernel refuses when the session is made: at load).  Nothing falls
back silently: every skipped blob is a ContextWarning and a line of ``Session.plan``.

Hashes verified by an earlier load of the same unchanged files are taken from the cache of
verified hashes (cache.py); a changed file is always hashed again.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from . import programs
from .backends import BACKENDS, backend_for, backend_problem, ort_runner, ort_session
from .cache import HashCache, file_identity
from .format import (EP_PREFIX, MAX_BLOB_BYTES, ContextError, ContextWarning, GraphIndex, hardware_problem,
                     is_known_backend, load_model, read_manifest, read_payload, scope_nodes, scope_problem)
from .partition import Step, plan_steps, submodel, value_types


# In ``backends``: every blob of an onnxruntime execution provider (imported from an EPContext model).
EP_FAMILY = "onnxruntime-ep"


@dataclass
class Choice:
    """What runs a scope, and why the other candidates were not used."""

    scope: str
    runner: str  # a backend name, or "original" (the scope's own nodes on onnxruntime)
    skipped: list[str] = field(default_factory=list)
    load_seconds: float = 0.0


class Session:
    """A planned model: ``run(output_names, feeds)`` like onnxruntime's InferenceSession."""

    def __init__(self, model, base_dir: Path, steps: list[Step], choices: dict[str, Choice], types, threads,
                 verification: dict | None = None, bf16_compute: bool | None = None):
        self.model = model
        self.verification = verification  # hashes computed and taken from the cache (None: no cache)
        self.base_dir = base_dir
        self.steps = steps
        self.choices = choices
        self._types = types
        self._threads = threads
        self._bf16_compute = bf16_compute
        self.output_names = [o.name for o in model.graph.output]
        self.input_names = [i.name for i in model.graph.input
                            if i.name not in {t.name for t in model.graph.initializer}]

    @property
    def plan(self) -> list[str]:
        lines = []
        for step in self.steps:
            if step.scope is not None:
                c = self.choices[step.scope]
                lines.append(f"scope {step.scope}: {c.runner} ({len(step.nodes)} nodes)")
            else:
                lines.append(f"onnxruntime: {len(step.nodes)} original nodes"
                             + (f" (scopes {', '.join(sorted(set(step.label.split(','))))})" if step.label else "")
                             + (f", onnxgen-kernels programs of {', '.join(step.inlined)}" if step.inlined else ""))
        return lines

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values = dict(feeds)
        for step in self.steps:
            step_feeds = {name: values[name] for name in step.inputs}
            try:
                results = step.runner(step_feeds)
            except Exception as error:  # noqa: BLE001 - a blob may fail in any way: fall back, loudly
                if step.scope is None and step.inlined:
                    for name in step.inlined:
                        warnings.warn(f"scope {name!r}: the step with its onnxgen-kernels programs failed to run "
                                      f"({type(error).__name__}: {error}); running its original nodes from now on",
                                      ContextWarning, stacklevel=2)
                        self.choices[name].skipped.append(f"onnxgen-kernels: failed to run: {error}")
                        self.choices[name].runner = "original"
                    step.inlined = []
                    step.runner = _original_runner(self.model, step, self._types(), self.base_dir, self._threads,
                                                   bf16_compute=self._bf16_compute)
                    results = step.runner(step_feeds)
                elif step.scope is None:
                    raise
                else:
                    results = self._fall_back(step, step_feeds, error)
            values.update(results)
            for name in step.frees:
                if name not in feeds:
                    values.pop(name, None)
        return [values[name] for name in (output_names or self.output_names)]

    def _fall_back(self, step: Step, step_feeds, error):
        warnings.warn(f"scope {step.scope!r}: the {self.choices[step.scope].runner} blob failed to run "
                      f"({type(error).__name__}: {error}); running its original nodes from now on",
                      ContextWarning, stacklevel=3)
        self.choices[step.scope].skipped.append(f"{self.choices[step.scope].runner}: failed to run: {error}")
        self.choices[step.scope].runner = "original"
        step.runner = _original_runner(self.model, step, self._types(), self.base_dir, self._threads,
                                       bf16_compute=self._bf16_compute)
        return step.runner(step_feeds)


def _original_runner(model, step: Step, types, base_dir, threads, replaced=None, inline=None, use=(),
                     bf16_compute: bool | None = None):
    """An onnxruntime session of the step's nodes (with the programs of the scopes in ``use``)."""
    nodes = _splice(step.nodes, replaced, use) if use else step.nodes
    sub = submodel(model, nodes, step.inputs, step.outputs, types, base_dir)
    if use:
        _add_programs(sub, inline, use)
    return ort_runner(ort_session(sub, threads=threads, bf16_compute=bf16_compute))


def load(model_path: str | os.PathLike, backends: Sequence[str] | None = None, *, allow_native_code: bool = False,
         strict: bool = False, max_blob_bytes: int = MAX_BLOB_BYTES, threads: int | None = None,
         hash_cache: bool = True, bf16_compute: bool | None = None) -> Session:
    """Plan and prepare ``model_path``'s run (see the module docstring).

    ``backends``: the backends whose blobs may be used, in order of preference (default: every
    known backend; ``"onnxruntime-ep"`` stands for every ``onnxruntime-ep:<provider>``);
    ``allow_native_code``: let blobs that are shared libraries be loaded;
    ``strict``: raise ContextError instead of falling back when the manifest or a scope is invalid;
    ``hash_cache``: take hashes verified before from files unchanged since (``cache.HashCache``;
    False: compute every hash).  ``Session.verification`` counts hashes computed and cached.
    ``bf16_compute``: in the onnxruntime steps, linear layers with bf16 weights on the kernels' bf16
    path, as ``onnxgen.backends.ort.session`` decides it (default: where the CPU has AMX).
    """
    model_path = Path(model_path)
    base_dir = model_path.parent
    cache = HashCache() if hash_cache else None
    model_identity = file_identity(model_path) if cache is not None else None
    model = load_model(model_path)
    if model_identity is not None and file_identity(model_path) != model_identity:
        model_identity = None  # changed while read: no cached scope hash for this load
    wanted = list(BACKENDS) + [EP_FAMILY] if backends is None else list(backends)
    unknown = [b for b in wanted if not (is_known_backend(b) or b == EP_FAMILY)]
    if unknown:
        raise ValueError(f"unknown backends {unknown} (known: {', '.join(BACKENDS)}, {EP_FAMILY}, "
                         f"{EP_PREFIX}<provider>)")

    def rank(backend: str) -> int | None:  # preference of a blob's backend; None: not requested
        if backend in wanted:
            return wanted.index(backend)
        if backend.startswith(EP_PREFIX) and EP_FAMILY in wanted:
            return wanted.index(EP_FAMILY)
        return None

    def refuse(message):
        if strict:
            raise ContextError(message)
        warnings.warn(message, ContextWarning, stacklevel=3)

    try:
        manifest = read_manifest(model)
    except ContextError as error:
        refuse(f"{model_path}: backend context refused ({error}); running the original graph")
        manifest = None
    groups = scope_nodes(model) if manifest else {}
    known_types = {}

    def types():  # computed once, when a piece of the graph must be cut out
        if not known_types:
            known_types.update(value_types(model))
        return known_types

    known_infos = {}

    def infos():  # value infos, for the sizes a FlexAttention plan was made for
        if not known_infos:
            known_infos.update((n, helper.make_value_info(n, t)) for n, t in types().items())
        return known_infos

    value_names: set[str] = set()

    def taken():  # every value name of the model (names a programs blob adds must be new)
        if not value_names:
            value_names.update(i.name for i in model.graph.input)
            value_names.update(t.name for t in model.graph.initializer)
            value_names.update(o for n in model.graph.node for o in n.output)
        return value_names

    choices: dict[str, Choice] = {}
    runners = {}
    inline: dict[str, programs.Inline] = {}
    graph_index = None  # made once, for the first scope that needs checking
    for name, scope in (manifest.scopes.items() if manifest else ()):
        choice = choices[name] = Choice(name, "original")
        for blob in scope.blobs:
            if not is_known_backend(blob.backend):
                choice.skipped.append(f"{blob.backend}: unknown backend")
                warnings.warn(f"scope {name!r}: blob of unknown backend {blob.backend!r} ignored", ContextWarning,
                              stacklevel=2)
        blobs = sorted((b for b in scope.blobs if is_known_backend(b.backend) and rank(b.backend) is not None),
                       key=lambda b: rank(b.backend))
        if not blobs:
            choice.skipped.append("no blob for the requested backends")
            continue
        if graph_index is None:
            graph_index = GraphIndex(model)
        problem = scope_problem(model, name, scope, groups.get(name, []), base_dir, cache=cache,
                                model_identity=model_identity, index=graph_index)
        if problem:
            refuse(f"scope {name!r}: {problem}; running its original nodes")
            choice.skipped.append(problem)
            continue
        for blob in blobs:
            reason = backend_problem(blob) or hardware_problem(blob.hardware)
            if reason is None and blob.native_code and not allow_native_code:
                reason = "the blob is native code (a shared library) and allow_native_code is False"
            start = time.perf_counter()
            if reason is None:
                try:
                    payload = read_payload(blob, base_dir, max_bytes=max_blob_bytes, cache=cache)
                    sub = None
                    if blob.backend == "onnxgen-kernels" and blob.format == programs.LIBRARY_FORMAT:
                        sub = submodel(model, groups[name], scope.inputs, scope.outputs, types(), base_dir)

                    def external(nodes=groups[name], scope=scope):  # the scope's weights as the model refers to them
                        return submodel(model, nodes, scope.inputs, scope.outputs, types(), keep_external=True)

                    loaded = backend_for(blob.backend).load(
                        payload, blob, scope.inputs, scope.outputs, sub=sub, allow_native_code=allow_native_code,
                        types=types, nodes=groups[name], scope_hash=scope.hash, infos=infos, taken=taken,
                        prefix=f"onnxgen.context/{name}", external=external, base_dir=base_dir)
                    if isinstance(loaded, programs.Inline):
                        inline[name] = loaded  # runs in the onnxruntime session of its neighbours
                    else:
                        runners[name] = loaded
                    choice.runner = blob.backend
                    choice.load_seconds = time.perf_counter() - start
                    break
                except Exception as error:  # noqa: BLE001 - any failure of a blob means: the next one
                    reason = f"{type(error).__name__}: {error}"
            choice.skipped.append(f"{blob.backend}: {reason}")
            warnings.warn(f"scope {name!r}: {blob.backend} blob not used ({reason})", ContextWarning, stacklevel=2)
    verification = None
    if cache is not None:
        cache.save()
        verification = {"computed": cache.computed, "cached": cache.cached}
    replaced = _replacements(groups, inline)
    if not runners:  # no blob runs apart: the plain model (programs spliced in), as one session
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in initializers]
        step = Step(list(model.graph.node), inputs, [o.name for o in model.graph.output],
                    label=",".join(sorted(choices)), inlined=sorted(inline))

        def whole(use):
            full = onnx.load(str(model_path))
            return ort_runner(ort_session(_spliced_model(full, model, replaced, inline, use), threads=threads,
                                          bf16_compute=bf16_compute))

        step.runner = _with_programs(step, whole, choices)
        return Session(model, base_dir, [step], choices, types, threads, verification, bf16_compute)
    isolated = {name: groups[name] for name in runners}
    steps = plan_steps(model, isolated)
    for step in steps:
        if step.scope is not None:
            step.runner = runners[step.scope]
        else:
            step.label = ",".join(sorted({s for n in step.nodes for s in [_scope(n)] if s}))
            step.inlined = sorted({s for n in step.nodes for s in [_scope(n)] if s in inline})

            def piece(use, step=step):
                return _original_runner(model, step, types(), base_dir, threads, replaced, inline, use,
                                        bf16_compute=bf16_compute)

            step.runner = _with_programs(step, piece, choices)
    return Session(model, base_dir, steps, choices, types, threads, verification, bf16_compute)


def _replacements(groups, inline) -> dict[int, tuple[str, list[onnx.NodeProto]]]:
    """id(node) -> (scope, the nodes that stand for it) for every node a programs blob replaces."""
    out = {}
    for name, found in inline.items():
        for index, nodes in found.replacements.items():
            out[id(groups[name][index])] = (name, nodes)
    return out


def _splice(nodes, replaced, use) -> list[onnx.NodeProto]:
    """``nodes`` with those of the scopes in ``use`` replaced in place (each replacement reads the
    node's inputs and makes its outputs, so the order stays topological)."""
    out = []
    for node in nodes:
        r = replaced.get(id(node))
        if r is not None and r[0] in use:
            out.extend(r[1])
        else:
            out.append(node)
    return out


def _add_programs(graph_model: onnx.ModelProto, inline, use) -> None:
    for name in sorted(use):
        graph_model.graph.initializer.extend(inline[name].initializers)
        for domain, version in inline[name].opsets.items():
            if not any(o.domain == domain for o in graph_model.opset_import):
                graph_model.opset_import.append(helper.make_opsetid(domain, version))


def _spliced_model(full, model, replaced, inline, use) -> onnx.ModelProto:
    """``full`` (the model with its weights, read from the same file as ``model``) with the
    programs of the scopes in ``use`` spliced in, in place (no copy of the weights)."""
    if not use:
        return full
    by_position = {i: replaced[id(n)] for i, n in enumerate(model.graph.node) if id(n) in replaced}
    nodes = []
    for i, node in enumerate(full.graph.node):
        r = by_position.get(i)
        if r is not None and r[0] in use:
            nodes.extend(r[1])
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            nodes.append(copy)
    del full.graph.node[:]
    full.graph.node.extend(nodes)
    _add_programs(full, inline, use)
    return full


def _with_programs(step: Step, build, choices):
    """``build(scopes)``: the runner of ``step`` with the programs of those scopes spliced in.  If
    the session cannot be made with them (the kernel refuses a program when it is created), every
    scope of the step goes back to its original nodes (compiled from the graph), with a warning."""
    if not step.inlined:
        return build(set())
    try:
        return build(set(step.inlined))
    except Exception as error:  # noqa: BLE001 - any refusal means: the original nodes
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        for name in step.inlined:
            warnings.warn(f"scope {name!r}: onnxgen-kernels programs refused when the session was made ({message}); "
                          "running its original nodes", ContextWarning, stacklevel=3)
            choices[name].skipped.append(f"onnxgen-kernels: refused at session creation: {message}")
            choices[name].runner = "original"
        step.inlined = []
        return build(set())


def _scope(node) -> str | None:
    from .format import scope_of

    return scope_of(node)
