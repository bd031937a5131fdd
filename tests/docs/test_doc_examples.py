"""Every Python block in README.md and docs/*.md runs as written, each in a fresh process.

A block is a complete script: it defines what it uses and prints or asserts what it shows. A marker on the
line just above a block's opening fence says how it runs:

    <!-- doc-test: torchrun 2 -->          under torchrun with 2 processes (the block sets up gloo)
    <!-- doc-test: cuda -->                needs a CUDA GPU (skipped without one, run where one is)
    <!-- doc-test: needs verl -->          needs a package the test extras cannot install (skipped without it)

Blocks in other languages (shell commands, output) are not run here. examples/ run in
tests/integrations/test_transformers_integration.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*doc-test:\s*(?P<kind>[\w-]+)(?:\s+(?P<arg>\S+))?\s*-->")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    code: str
    kind: str | None = None  # the marker's, if any
    arg: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown page, with the marker above each."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            marker = MARKER.search(lines[start - 1]) if start else None
            rel = str(path.relative_to(ROOT))
            code = "\n".join(lines[start + 1 : j]) + "\n"
            out.append(Block(rel, start + 1, code, *(marker.group("kind", "arg") if marker else (None, None))))
            i = j
        i += 1
    return out


BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def test_every_marker_is_known():
    kinds = {b.kind for b in BLOCKS if b.kind is not None}
    assert kinds <= {"torchrun", "cuda", "needs"}, kinds


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_doc_block_runs(block: Block, tmp_path):
    if block.kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("a GPU-only block (no CUDA device here)")
    if block.kind == "needs" and importlib.util.find_spec(block.arg) is None:
        pytest.skip(f"needs {block.arg}, which is not installed")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    if block.kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={block.arg}"]
        cmd.append(str(script))
    else:
        cmd = [sys.executable, str(script)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, f"{block.id} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert run.stdout.strip(), f"{block.id} printed nothing: a block shows its result"
