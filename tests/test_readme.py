"""Every ``python`` block of the README runs, in order, in one namespace."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in BLOCKS:
        if "same_kwargs" in block:  # needs a perceiver-pytorch model: covered by tests/parity
            continue
        block = block.replace("/tmp/", f"{tmp_path}{os.sep}")
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the docs' own examples
