"""docs/Operators.md is generated from the schemas and its examples run."""

from pathlib import Path

import pytest

from onnxgen.ops import OPS
from onnxgen.ops.docs import render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "Operators.md"


def test_operators_md_is_current():
    assert DOCS.exists(), "docs/Operators.md is missing: run `onnxgen docs`"
    assert DOCS.read_text() == render(), "docs/Operators.md is stale: run `onnxgen docs`"


@pytest.mark.parametrize("name", sorted(OPS))
def test_example_runs(name):
    exec(compile(OPS[name].module.EXAMPLE, f"<{name} example>", "exec"), {})
