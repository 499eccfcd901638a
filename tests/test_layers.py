"""The house's layers: imports run one way, from the command line down to the kernels.

A module may import its own layer or any below it, never one above: the stages and the audit
never import the job, the Spark helpers import no stage, and the kernels import nothing of ours
but themselves; constants and errors are leaves. Inside ``io/``, folders by who runs the code:
the driver's listing over the tasks' formats, both (and the tables) over store access.

And the house's proportions: no module over 450 lines, no function over 80, no public function
taking more than 5 positional parameters (a longer call says its settings by keyword).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bfpack_spark"

#: top first; a module belongs to the first layer one of whose prefixes it starts with
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("shell", ("bfpack_spark.cli", "bfpack_spark.daemon")),
    ("jobs", ("bfpack_spark.job", "bfpack_spark.export", "bfpack_spark.report", "bfpack_spark.loader")),
    ("stages", ("bfpack_spark.stages", "bfpack_spark.audit", "bfpack_spark.incremental", "bfpack_spark.snapshot")),
    ("spark helpers", ("bfpack_spark.spark",)),
    ("foundation", ("bfpack_spark.io", "bfpack_spark.config", "bfpack_spark.flags", "bfpack_spark.schemas",
                    "bfpack_spark.stats", "bfpack_spark.faults", "bfpack_spark.tokenize",
                    "bfpack_spark.fast_engine")),
    ("kernels", ("bfpack_spark.packing", "bfpack_spark.masks")),
    ("leaves", ("bfpack_spark.errors", "bfpack_spark.constants")),
]

#: io's folders, top first: none imports one above it (store imports none of the others)
IO_LAYERS = [("bfpack_spark.io.listing",), ("bfpack_spark.io.formats", "bfpack_spark.io.tables"),
             ("bfpack_spark.io.store",)]
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_POSITIONAL = 450, 80, 5


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


def io_layer(module: str) -> int | None:
    for depth, prefixes in enumerate(IO_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return depth
    return None


def test_io_folders_import_one_way() -> None:
    wrong = []
    for module, path in sorted(modules().items()):
        mine = io_layer(module)
        if mine is None:
            continue
        for imported in sorted(imports(path)):
            theirs = io_layer(imported)
            same_folder = imported.split(".")[:3] == module.split(".")[:3]
            if theirs is not None and not same_folder and theirs <= mine:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_every_io_folder_says_what_lives_there_and_who_calls_it() -> None:
    for folder in ("listing", "formats", "store", "tables"):
        doc = ast.get_docstring(ast.parse((PACKAGE / "io" / folder / "__init__.py").read_text()))
        assert doc and len(doc.split()) > 15, folder


def test_modules_and_functions_are_short_and_calls_say_their_settings() -> None:
    too_long, long_functions, positional = [], [], []
    for module, path in sorted(modules().items()):
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {len(source.splitlines())} lines")
        private_module = any(part.startswith("_") and part != "__init__" for part in module.split("."))
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long_functions.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
            args = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if not private_module and not node.name.startswith("_") and len(args) > MAX_POSITIONAL:
                positional.append(f"{module}.{node.name}: {len(args)} positional parameters")
    assert not (too_long or long_functions or positional), "\n".join(too_long + long_functions + positional)

