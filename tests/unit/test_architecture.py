"""The import graph of prorch has no cycle, counting function-level and ``TYPE_CHECKING``
imports (grimp sees both); the layers themselves are checked by import-linter (pyproject.toml's
``[tool.importlinter]``), run here too so that a plain ``pytest`` catches a broken layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            groups.append(group)

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def module_graph() -> dict[str, set[str]]:
    """Every module, package roots (``__init__``) included: a cycle through a package's
    ``__init__`` is a cycle too."""
    imports = grimp.build_graph("prorch", "repositories", cache_dir=None)
    modules = set(imports.modules)
    return {m: imports.find_modules_directly_imported_by(m) & modules for m in modules}


def test_a_cycle_is_found_when_there_is_one() -> None:
    groups = strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert [g for g in groups if len(g) > 1] == [{"a", "b", "c"}]


def test_prorch_has_no_import_cycle() -> None:
    cycles = [sorted(group) for group in strongly_connected(module_graph()) if len(group) > 1]
    assert cycles == []


def test_no_module_imports_the_prorch_package_itself() -> None:
    imports = grimp.build_graph("prorch", cache_dir=None)
    importers = sorted(imports.find_modules_that_directly_import("prorch"))
    assert importers == []


def test_the_layer_contracts_are_kept() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "importlinter.cli", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_belongs_to_a_layer() -> None:
    """A module missing from the layers contract would be checked by nothing."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    listed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    modules = grimp.build_graph("prorch", cache_dir=None).modules - {"prorch"}
    unlisted = sorted(m for m in modules if not any(m == name or m.startswith(name + ".") for name in listed))
    assert unlisted == []


def test_each_module_logs_under_its_own_name() -> None:
    """A module's ``logger`` is named after the module (``repositories.*`` under ``prorch.``), so
    that a log line says where it came from and ``prorch.X`` can be set to its own level."""
    import importlib
    import logging
    import pkgutil

    wrong = {}
    for package in ("prorch", "repositories"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if ".migrations." in info.name or info.name.endswith(".__main__"):
                continue
            logger = getattr(importlib.import_module(info.name), "logger", None)
            if isinstance(logger, logging.Logger):
                wanted = info.name if package == "prorch" else f"prorch.{info.name}"
                if logger.name != wanted:
                    wrong[info.name] = logger.name
    assert wrong == {}


def contract_layers() -> list[set[str]]:
    """The layers contract's layers, top first, each as the set of its packages and modules."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return [{name.strip() for name in layer.replace("|", ":").split(":")} for layer in layers]


def documented_layers() -> list[tuple[set[str], set[str]]]:
    """docs/architecture.md's layers table, top first: per row, the dotted names it gives
    (``prorch.engine``) and the other names in backquotes (the modules: ``runner``)."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    layers = []
    for row in rows:
        modules_cell = row.split("|")[2]
        names = set(re.findall(r"`([^`]+)`", modules_cell))
        layers.append(({n for n in names if n.startswith("prorch.")}, {n for n in names if "." not in n}))
    return layers


def test_the_architecture_doc_shows_the_contract_layers() -> None:
    """Each row of the doc's table names exactly the packages of one layer, in the contract's order."""
    assert [dotted for dotted, _ in documented_layers()] == contract_layers()


def test_the_architecture_doc_names_every_module() -> None:
    """Every module of prorch appears in its layer's row (``prorch.engine.journal`` as ``journal``)."""
    rows = documented_layers()
    missing = []
    for module in sorted(grimp.build_graph("prorch", cache_dir=None).modules - {"prorch"}):
        for dotted, short in rows:
            owner = next((name for name in dotted if module == name or module.startswith(name + ".")), None)
            if owner is not None:
                if module != owner and module[len(owner) + 1 :] not in short:
                    missing.append(module)
                break
        else:
            missing.append(module)
    assert missing == []
