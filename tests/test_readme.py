"""README's Python blocks run as written, each in a fresh interpreter (as a reader pasting it
into `python` would), in an empty folder (blocks that save artifacts write there). Each block
defines what it uses, with the zoo's and pipelines' tiny models where the real ones would need
a GPU. A block that stops working is a README that lies.

The blocks that run a whole pipeline or compile several times are marked slow (README's test
line leaves them to CI's second command); the model zoo's block stays in the quick line, and
every block is checked to parse there."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# the blocks quick enough for README's test line, by the start of one of their lines
QUICK = ('inputs = zoo.example_inputs("svd-tiny", batch=2)',)


def _quick(block: str) -> bool:
    return any(line.startswith(QUICK) for line in block.splitlines())


def _params():
    for index, block in enumerate(BLOCKS):
        quick = _quick(block)
        yield pytest.param(index, id=str(index + 1), marks=() if quick else pytest.mark.slow)


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(BLOCKS) >= 6, "README's python blocks moved: update this test"
    assert sum(map(_quick, BLOCKS)) == len(QUICK), "the quick blocks moved: update QUICK"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_parses_and_imports_what_it_uses(index):
    tree = ast.parse(BLOCKS[index], f"README.md python block {index + 1}")
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert imported, "each block imports what it uses (it runs in a fresh interpreter)"


@pytest.mark.parametrize("index", list(_params()))
def test_readme_block_runs_as_written_in_a_fresh_interpreter(index, tmp_path):
    # as a user's shell: no TRITON_INTERPRET (on CPU the fme ops run their torch references);
    # FME_STRICT as in every test, so a failing rewrite raises instead of passing quietly
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["FME_STRICT"] = "1"
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README.md python block {index + 1}:\n{result.stderr[-4000:]}"
