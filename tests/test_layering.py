"""The package's layers import one way only, and no module imports itself back through another.

    public API (functional, modules, linear, rl, distill, distributed, dtensor, integrations, labels, cli, bench)
      -> validation/ (arguments -> typed problems)
      -> ops/ (custom ops declared once, autograd, the eager / traced / torch.func routes)
      -> exchange (the vocab-parallel losses' one-collective protocol)
      -> kernels: the drivers of each computation (__init__, portable, linear, distill, blocks)
      -> kernels/driver.py (the one chunk driver)
      -> kernels: the backends (backends, triton_rows)
      -> kernels/rows.py, kernels/distill_rows.py (the row math)
    checks.py (the argument checks shared by validation and the ops' run-time checks), problems.py (the
    typed problems) and reference.py (the formulas) sit below everything.

Every module of the package must have a layer here: a new module is placed deliberately. Every `import`
counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "xent"

LAYERS = [  # top to bottom
    {
        "xent",
        "xent.functional",
        "xent.modules",
        "xent.linear",
        "xent.distributed",
        "xent.dtensor",
        "xent.rl",
        "xent.distill",
        "xent.integrations",
        "xent.integrations.transformers",
        "xent.integrations.trl",
        "xent.integrations.torchtitan",
        "xent.integrations.verl",
        "xent.labels",
        "xent.cli",
        "xent.bench",
    },
    {"xent.validation", "xent.validation.cross_entropy", "xent.validation.distill"},
    {"xent.ops", "xent.ops.rl", "xent.ops.distill", "xent.ops.vocab_parallel"},
    {"xent.ops.linear"},
    {"xent.ops.cross_entropy"},
    {"xent.ops.declare", "xent.ops.handover", "xent.ops.statistics"},
    {"xent.exchange"},
    {"xent.kernels.blocks"},
    {"xent.kernels", "xent.kernels.portable", "xent.kernels.linear", "xent.kernels.distill"},
    {"xent.kernels.driver"},
    {"xent.kernels.backends", "xent.kernels.triton_rows"},
    {"xent.kernels.rows", "xent.kernels.distill_rows"},
    {"xent.checks"},
    {"xent.problems", "xent.reference"},
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """xent modules imported by the file at `path` (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("xent")}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if not module.startswith("xent"):
                continue
            for alias in node.names:  # `from . import rows` imports the module xent.kernels.rows
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in RANK else module)
    return found - {name}


GRAPH = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_module_has_a_layer():
    assert set(GRAPH) <= set(RANK), sorted(set(GRAPH) - set(RANK))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = {dep for dep in GRAPH[module] if RANK[dep] < RANK[module]}
    assert not upward, f"{module} (layer {RANK[module]}) imports {sorted(upward)} from a layer above it"


@pytest.mark.parametrize("module", sorted(LAYERS[0]))
def test_public_api_reaches_the_computation_through_the_ops(module):
    """The public API imports validation, ops and the bottom modules, never the layers below the ops."""
    below_ops = {dep for dep in GRAPH[module] if dep.startswith(("xent.kernels", "xent.exchange"))}
    assert not below_ops, f"{module} imports {sorted(below_ops)} directly, past the ops"


@pytest.mark.parametrize("module", sorted(m for m in RANK if m.startswith(("xent.kernels", "xent.exchange"))))
def test_kernels_and_exchange_know_no_autograd_layer(module):
    """Below the ops nothing imports validation, the ops or the public API (checked by rank above), and
    nothing registers custom ops or autograd: those are the ops layer's alone."""
    path = SRC.parent / (module.replace(".", "/") + ".py")
    path = path if path.exists() else SRC.parent / module.replace(".", "/") / "__init__.py"
    text = path.read_text()
    assert "torch.library" not in text and "autograd.Function" not in text, f"{module} defines ops or autograd"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in sorted(GRAPH.get(module, ())):
            visit(dep, path + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        visit(module, [])
