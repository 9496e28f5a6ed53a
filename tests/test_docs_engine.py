"""The Python examples in docs/Engine.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "Engine.md"


def test_engine_guide_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs"})
    assert "tokens" in capsys.readouterr().out
