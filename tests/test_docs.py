"""Every ``python`` block of docs/*.md runs, in order, one namespace per page (as tests/test_readme.py does for
the README), except the blocks that stand for the reader's own data."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PLACEHOLDERS = ("x_train", "path/or/owner-name")  # the reader's arrays / files


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_doc_python_blocks_run(doc: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # examples read the test data as from a checkout
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.DOTALL):
        if not any(p in block for p in PLACEHOLDERS):
            exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102 - the docs' own examples
