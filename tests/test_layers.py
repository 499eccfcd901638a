"""The house's layers: imports run one way, from the command line down to the kernels.

A module may import its own layer or any below it, never one above: the stages and the audit
never import the job, the Spark helpers import no stage, and the kernels import nothing of ours
but themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bfpack_spark"

#: top first; a module belongs to the first layer one of whose prefixes it starts with
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("shell", ("bfpack_spark.cli", "bfpack_spark.daemon")),
    ("jobs", ("bfpack_spark.job", "bfpack_spark.export", "bfpack_spark.report", "bfpack_spark.loader")),
    ("stages", ("bfpack_spark.stages", "bfpack_spark.audit", "bfpack_spark.incremental")),
    ("spark helpers", ("bfpack_spark.spark",)),
    ("foundation", ("bfpack_spark.io", "bfpack_spark.config", "bfpack_spark.schemas", "bfpack_spark.metrics",
                    "bfpack_spark.figures", "bfpack_spark.stats", "bfpack_spark.faults", "bfpack_spark.tokenize")),
    ("kernels", ("bfpack_spark.packing", "bfpack_spark.masks")),
    ("leaves", ("bfpack_spark.errors",)),
]


def layer(module: str) -> int:
    if module == "bfpack_spark":  # the package's __init__: the version, nothing else
        return 0
    for depth, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return depth
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bfpack_spark"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}".replace(".", "/") + ".py" in _FILES)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("bfpack_spark"))
    return {n for n in names if n != "bfpack_spark"}


_FILES = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")}


def test_every_module_is_in_a_layer() -> None:
    for module in modules():
        layer(module)


def test_no_module_imports_one_above_it() -> None:
    upward = []
    for module, path in sorted(modules().items()):
        for imported in sorted(imports(path)):
            if layer(imported) < layer(module):
                upward.append(f"{module} ({LAYERS[layer(module)][0]}) imports {imported} "
                              f"({LAYERS[layer(imported)][0]})")
    assert not upward, "\n".join(upward)
