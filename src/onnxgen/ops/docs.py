"""Render docs/Operators.md from the registered schemas (``onnxgen docs`` writes it)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import defs

from . import OPS
from .domain import DOMAIN, DOMAIN_VERSION

HEADER = f"""\
# Operators of the `{DOMAIN}` domain (version {DOMAIN_VERSION})

<!-- Generated from the schemas by `onnxgen docs`; edit the op modules in src/onnxgen/ops/, not this file. -->

Experimental operators for generative models, designed so that a move to `ai.onnx.preview`
is a rename. `import onnxgen` registers them with `onnx.defs`, so `onnx.checker` and
`onnx.shape_inference` understand models that use them. Every op has a numpy reference
(`onnxgen.backends.reference.evaluator(model)` runs it) and a function body in standard ONNX
ops (`onnxgen.passes.expand(model)` inlines it, so stock onnxruntime runs the model).

"""


def _attribute_default(attr: defs.OpSchema.Attribute) -> str:
    if attr.required:
        return "required"
    value = attr.default_value
    if value is None or value.type == 0:
        return "optional"
    return f"`{onnx.helper.get_attribute_value(value)!r}`".replace("b'", "'")


def _param_rows(params) -> list[str]:
    rows = ["| name | type | description |", "|---|---|---|"]
    for p in params:
        optional = " (optional)" if p.option == defs.OpSchema.FormalParameterOption.Optional else ""
        rows.append(f"| `{p.name}`{optional} | {p.type_str} | {p.description} |")
    return rows


def render_op(name: str) -> str:
    op = OPS[name]
    schema = defs.get_schema(name, DOMAIN_VERSION, DOMAIN)
    lines = [f"## {name}", "", schema.doc.strip(), "", "### Inputs", "", *_param_rows(schema.inputs), "",
             "### Outputs", "", *_param_rows(schema.outputs), ""]
    if schema.attributes:
        lines += ["### Attributes", "", "| name | type | default | description |", "|---|---|---|---|"]
        for attr_name, attr in schema.attributes.items():
            kind = attr.type.name.lower()
            lines.append(f"| `{attr_name}` | {kind} | {_attribute_default(attr)} | {attr.description} |")
        lines.append("")
    lines += ["### Type constraints", ""]
    for constraint in schema.type_constraints:
        lines.append(f"- `{constraint.type_param_str}`: {', '.join(constraint.allowed_type_strs)}. {constraint.description}")
    lines += ["", "### Example", "", "```python", op.module.EXAMPLE.rstrip(), "```", ""]
    return "\n".join(lines)


def render_score_mods() -> str:
    """The score-mod library (``onnxgen.ops.score_mods``): its doc, then each builder's."""
    import inspect

    from . import score_mods

    lines = ["## Score mods", "", "`onnxgen.ops.score_mods`: " + inspect.cleandoc(score_mods.__doc__), ""]
    for name in ("causal", "sliding_window", "softcap", "alibi", "alibi_slopes", "relative_position_bias",
                 "prefix_lm", "document_mask", "compose", "flex_score_mod"):
        function = getattr(score_mods, name)
        lines += [f"### `{name}{inspect.signature(function)}`", "", inspect.cleandoc(function.__doc__), ""]
    return "\n".join(lines)


def render() -> str:
    index = [f"- [{name}](#{name.lower()})" for name in sorted(OPS)] + ["- [Score mods](#score-mods)"]
    return (HEADER + "\n".join(index) + "\n\n" + "\n".join(render_op(name) for name in sorted(OPS))
            + "\n" + render_score_mods())


def write(path: str | Path = "docs/Operators.md") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    return path
