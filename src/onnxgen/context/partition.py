"""Cutting a model into steps: each scope that runs a blob is one step, everything else is
grouped into as few onnxruntime steps as the dependencies allow.  Also: the standalone model of
any group of nodes (what a backend compiles, and what the fallback runs)."""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field

import onnx
from onnx import external_data_helper, helper

from .format import boundary, node_inputs


@dataclass
class Step:
    """One piece of the plan: ``nodes`` run together; ``scope`` names it when it is one scope."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    scope: str | None = None
    runner: object = None
    label: str = ""
    frees: list[str] = field(default_factory=list)  # values no later step reads
    inlined: list[str] = field(default_factory=list)  # scopes run from onnxgen-kernels programs in this step


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type of every value of the main graph, by shape inference on a copy without weights
    (each initializer becomes a typed graph input; tiny ones stay so shapes still fold)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    graph = skeleton.graph
    keep, declared = [], {i.name for i in graph.input}
    for tensor in graph.initializer:
        small = tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() <= 1024
        if small:
            keep.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    try:
        skeleton = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # noqa: BLE001 - partial types are still useful; missing ones are reported below
        pass
    types = {}
    for info in list(skeleton.graph.input) + list(skeleton.graph.value_info) + list(skeleton.graph.output):
        if info.type.HasField("tensor_type") or info.type.WhichOneof("value"):
            types.setdefault(info.name, info.type)
    for tensor in model.graph.initializer:
        types.setdefault(tensor.name, helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
    return types


def submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str],
             types: dict[str, onnx.TypeProto], base_dir: str | os.PathLike | None = None, *,
             keep_external: bool = False) -> onnx.ModelProto:
    """A standalone model of ``nodes``: ``inputs`` become graph inputs, ``outputs`` its outputs,
    the weights they read its initializers (external data read in from ``base_dir``; with
    ``keep_external`` left where it is: the references stay, relative to the model's folder)."""
    graph_inputs = {i.name for i in model.graph.input}
    read = {n for node in nodes for n in node_inputs(node)}
    initializers = []
    for tensor in model.graph.initializer:
        if tensor.name in read and (tensor.name not in graph_inputs or tensor.name not in inputs):
            t = onnx.TensorProto()
            t.CopyFrom(tensor)
            if external_data_helper.uses_external_data(t) and not keep_external:
                if base_dir is None:
                    raise ValueError(f"weight {t.name!r} is external data: pass the model's folder")
                external_data_helper.load_external_data_for_tensor(t, str(base_dir))
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
            initializers.append(t)

    def info(name):
        if name not in types:
            raise ValueError(f"the type of {name!r} is unknown (shape inference could not find it)")
        return helper.make_value_info(name, types[name])

    graph = helper.make_graph(list(nodes), model.graph.name or "scope", [info(n) for n in inputs],
                              [info(n) for n in outputs], initializers)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                            functions=list(model.functions))
    for node in sub.graph.node:  # the scope marks belong to the full model, not to its pieces
        keep = [p for p in node.metadata_props if not p.key.startswith("onnxgen.context.")]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return sub


def _weight_nodes_joining_their_reader(model: onnx.ModelProto, owner: dict[int, str]) -> dict[int, int]:
    """id(node) -> id(its reader) for each node outside the scopes that reads nothing but weights
    (a Cast widening a bf16 weight, a Constant) and whose outputs one node outside the scopes reads.
    Such a node runs in its reader's step: scheduled alone it would run in the first step and hand a
    computed copy of the weight to a later one (held until then), and the step of a MatMul would
    not see the Cast of its weight, which the bf16 rewrite (``passes.bf16_linear``) looks for."""
    graph_inputs = {i.name for i in model.graph.input}
    weights = {t.name for t in model.graph.initializer if t.name not in graph_inputs}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node_inputs(node)):
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    joins = {}
    for node in model.graph.node:
        if id(node) in owner or not all(name in weights for name in node_inputs(node)):
            continue
        outputs = [o for o in node.output if o]
        reading = {id(r): r for o in outputs for r in readers.get(o, [])}
        if len(reading) == 1 and not graph_outputs.intersection(outputs):
            reader = next(iter(reading.values()))
            if id(reader) not in owner:
                joins[id(node)] = id(reader)
    return joins


def plan_steps(model: onnx.ModelProto, isolated: dict[str, list[onnx.NodeProto]]) -> list[Step]:
    """Steps in a valid order: each group in ``isolated`` (scope name -> its nodes, each convex)
    alone, every other node in as few merged steps as possible."""
    owner = {}
    for name, nodes in isolated.items():
        for node in nodes:
            owner[id(node)] = name
    units: list[tuple] = []  # (key, nodes)
    unit_of = {}
    for name, nodes in isolated.items():
        unit_of[name] = len(units)
        units.append((name, nodes))
    joins = _weight_nodes_joining_their_reader(model, owner)
    for node in model.graph.node:
        if id(node) not in owner and id(node) not in joins:
            unit_of[id(node)] = len(units)
            units.append((None, [node]))
    for node in model.graph.node:
        if id(node) in joins:
            reader = joins[id(node)]
            while reader in joins:  # a chain of them (Cast, then Transpose, say) ends at one reader
                reader = joins[reader]
            unit_of[id(node)] = unit_of[reader]
            units[unit_of[reader]][1].append(node)
    maker = {}
    for u, (_, nodes) in enumerate(units):
        for node in nodes:
            for o in node.output:
                if o:
                    maker[o] = u
    deps = [set() for _ in units]
    users = [set() for _ in units]
    for u, (_, nodes) in enumerate(units):
        for node in nodes:
            for name in node_inputs(node):
                p = maker.get(name)
                if p is not None and p != u:
                    deps[u].add(p)
                    users[p].add(u)
    first = {}  # graph position of each unit: a stable tie-break
    for i, node in enumerate(model.graph.node):
        u = unit_of[owner.get(id(node), id(node))]
        first.setdefault(u, i)
    waiting = [len(d) for d in deps]
    # Kahn's algorithm, preferring plain nodes (they merge into the current step) over scopes.
    ready = [(units[u][0] is not None, first[u], u) for u in range(len(units)) if waiting[u] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, u = heapq.heappop(ready)
        order.append(u)
        for v in users[u]:
            waiting[v] -= 1
            if waiting[v] == 0:
                heapq.heappush(ready, (units[v][0] is not None, first[v], v))
    if len(order) != len(units):
        raise ValueError("the scopes make a cycle: a scope is not convex")
    groups: list[tuple[str | None, list]] = []
    for u in order:
        key, nodes = units[u]
        if key is None and groups and groups[-1][0] is None:
            groups[-1][1].extend(nodes)
        else:
            groups.append((key, list(nodes)))
    steps = []
    for key, nodes in groups:
        if key is None:  # keep the graph's own order inside a merged step (it is topological)
            position = {id(n): i for i, n in enumerate(model.graph.node)}
            nodes.sort(key=lambda n: position[id(n)])
        inputs, outputs, _ = boundary(model, nodes)
        steps.append(Step(nodes, inputs, outputs, scope=key))
    read_later: set[str] = {o.name for o in model.graph.output}
    for step in reversed(steps):  # a value can be dropped after its last reader
        step.frees = [n for n in step.inputs if n not in read_later]
        read_later.update(step.inputs)
    return steps


def external_layout(model: onnx.ModelProto) -> list[list]:
    """Where each external weight of ``model`` lies: ``[name, location, offset, length]``, sorted by
    name (offset and length as the model says them, "" where it leaves them out)."""
    layout = []
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            entries = {e.key: e.value for e in tensor.external_data}
            layout.append([tensor.name, entries.get("location", ""), entries.get("offset", ""),
                           entries.get("length", "")])
    return sorted(layout)
