"""``onnxgen context ...``: annotate, compile, inspect, check, strip, import-epcontext."""

from __future__ import annotations

import argparse


def _annotate(args) -> int:
    from .tools import annotate

    nodes = None
    if args.nodes:
        nodes = {}
        for i, spec in enumerate(args.nodes):
            name, _, names = spec.rpartition("=")
            nodes[name or f"scope_{i}"] = [n for n in names.split(",") if n]
    scopes = annotate(args.model, args.output, op_types=args.op_type, nodes=nodes, backend=args.auto,
                      min_nodes=args.min_nodes)
    for name, scope in scopes.items():
        print(f"{name}: {scope.nodes} nodes, inputs {scope.inputs}, outputs {scope.outputs}")
    print(f"wrote {args.output or args.model}: {len(scopes)} scopes, no blobs yet (onnxgen context compile)")
    return 0


def _compile(args) -> int:
    from .tools import compile

    results = compile(args.model, args.backend, args.output, scopes=args.scope, embed=args.embed, format=args.format)
    for r in results:
        print(f"{r.scope}: " + (f"{r.size} bytes in {r.seconds:.2f} s" if r.error is None else f"skipped ({r.error})"))
    made = sum(r.error is None for r in results)
    print(f"wrote {args.output or args.model}: {made} {args.backend} blobs")
    return 0 if made else 1


def _inspect(args) -> int:
    from .tools import inspect

    print(inspect(args.model))
    return 0


def _check(args) -> int:
    from .format import check

    report = check(args.model)
    for problem in report.problems():
        print(f"error: {problem}")
    print(f"{args.model}: " + ("valid" if report.ok else "INVALID"))
    return 0 if report.ok else 1


def _strip(args) -> int:
    from .tools import strip

    print(f"wrote {strip(args.model, args.output)}: the plain model (scope marks and manifest removed)")
    return 0


def _import_epcontext(args) -> int:
    from .epcontext import import_epcontext

    results = import_epcontext(args.source, args.epctx, args.output, embed=args.embed)
    for r in results:
        print(f"{r.node}: scope {r.scope} ({r.nodes} source nodes{', an existing scope' if r.reused_scope else ''}), "
              f"{r.backend} {r.backend_version} blob of {r.size} bytes, {r.where}")
    print(f"wrote {args.output}: the source graph with {len(results)} EPContext blobs (onnxgen context inspect)")
    return 0


def add_parser(commands) -> None:
    context = commands.add_parser(
        "context", help="backend context: ahead-of-time blobs per backend, the original graph kept",
        description="Scope groups of nodes (node metadata), compile them ahead of time per backend, and keep the "
                    "graph as the fallback. See docs/BackendContext.md.")
    verbs = context.add_subparsers(dest="verb", required=True, metavar="VERB")

    annotate = verbs.add_parser("annotate", help="mark scopes and write a manifest (replaces any earlier context)",
                                epilog="examples: onnxgen context annotate m/model.onnx --auto openvino; "
                                       "--op-type MoE; --nodes attn0=node_a,node_b")
    annotate.add_argument("model")
    annotate.add_argument("-o", "--output", help="default: in place")
    how = annotate.add_mutually_exclusive_group(required=True)
    how.add_argument("--op-type", action="append", help="the largest convex groups of these op types (repeatable)")
    how.add_argument("--nodes", action="append", metavar="[SCOPE=]NAME,NAME",
                     help="one scope of the named nodes (repeatable)")
    how.add_argument("--auto", metavar="BACKEND", help="the largest convex groups BACKEND supports")
    annotate.add_argument("--min-nodes", type=int,
                          help="leave out smaller groups (default: 2 with --auto, 1 with --auto onnxgen-kernels; else 1)")
    annotate.set_defaults(run=_annotate)

    comp = verbs.add_parser("compile", help="compile the scopes with a backend and record the blobs")
    comp.add_argument("model")
    comp.add_argument("--backend", required=True, choices=["openvino", "onnxruntime", "onnxgen-kernels"])
    comp.add_argument("-o", "--output", help="default: in place (blobs in <model>.context/ beside it)")
    comp.add_argument("--scope", action="append", help="only these scopes (repeatable)")
    comp.add_argument("--embed", action="store_true", help="put the payloads in the manifest (base64)")
    comp.add_argument("--format", choices=["onnxgen.kernels.programs", "onnxgen.kernels.library"],
                      help="onnxgen-kernels: compiled score programs (data) or the kernel library (native code); "
                           "default: programs where the scope has score_mods or FlexAttention to compile")
    comp.set_defaults(run=_compile)

    insp = verbs.add_parser("inspect", help="a table of scopes and blobs, sizes, validity on this machine")
    insp.add_argument("model")
    insp.set_defaults(run=_inspect)

    chk = verbs.add_parser("check", help="validate the manifest, hashes and blobs (exit 1 when invalid)")
    chk.add_argument("model")
    chk.set_defaults(run=_check)

    imp = verbs.add_parser("import-epcontext", help="an onnxruntime EPContext model + its source model -> this format",
                           description="Match each com.microsoft.EPContext node of EPCTX to the SOURCE nodes it "
                                       "replaced, mark them as a scope and keep the node's payload as a blob of "
                                       "backend onnxruntime-ep:<source>; the written model is the SOURCE graph.")
    imp.add_argument("source", help="the model the EPContext model was made from")
    imp.add_argument("epctx", help="the EPContext model (its embed_mode=0 files beside it)")
    imp.add_argument("output", help="the model to write (blobs in <output>.context/ beside it)")
    imp.add_argument("--embed", action="store_true", help="put the payloads in the manifest (base64)")
    imp.set_defaults(run=_import_epcontext)

    strip = verbs.add_parser("strip", help="back to the plain model (same graph, no scopes, no manifest)")
    strip.add_argument("model")
    strip.add_argument("-o", "--output", help="default: in place")
    strip.set_defaults(run=_strip)


def build(argv=None):  # for tests: the group alone
    parser = argparse.ArgumentParser(prog="onnxgen")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)
