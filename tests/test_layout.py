"""The package's layout stays what docs/architecture.md draws: every import points down.

The import graph is read from the source (every ``import``, at the top, under ``TYPE_CHECKING``
and inside functions), at two levels: modules, and folders (a subpackage is one node, a module
at the package root its own). Neither may have a cycle, and every edge must go to the same or a
lower layer of :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ppo_cbp"
SOURCES = {"ppo_cbp": PACKAGE, "ppo_cbp.envs": ROOT / "envs"}  # as pyproject.toml installs them

LAYERS = [
    (
        "foundations",
        {"ppo_cbp.errors", "ppo_cbp.formatting", "ppo_cbp.seeding", "ppo_cbp.provenance"},
    ),
    (
        "run infrastructure",
        {"ppo_cbp.run_folder", "ppo_cbp.cli", "ppo_cbp.init", "ppo_cbp.tracking"},
    ),
    ("data and networks", {"ppo_cbp.nets", "ppo_cbp.datasets", "ppo_cbp.envs"}),
    ("metrics", {"ppo_cbp.metrics"}),
    ("operators", {"ppo_cbp.plasticity"}),
    ("trainers and benchmarks", {"ppo_cbp.ppo", "ppo_cbp.benchmarks"}),
    ("reporting", {"ppo_cbp.reporting"}),
    (
        "command lines",
        {
            "ppo_cbp.train",
            "ppo_cbp.sweep",
            "ppo_cbp.commands",
            "ppo_cbp",
        },
    ),
]
"""The layers, lowest first. A new module at the package root or a new folder takes its place
here (and in docs/architecture.md)."""


def modules() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> file."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if name.startswith("ppo_cbp.envs") and prefix == "ppo_cbp" and folder == PACKAGE:
                continue
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, wherever in the file the import is."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for candidate in candidates:
            # the longest known module that the import names
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def folder_of(module: str) -> str:
    """The node of a module at folder level: its subpackage, or itself at the package root."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    if module.startswith("ppo_cbp.envs"):
        return "ppo_cbp.envs"
    return module


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def folder_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for module, targets in edges.items():
        here = folder_of(module)
        folders.setdefault(here, set()).update(
            folder_of(t) for t in targets if folder_of(t) != here
        )
    return folders


def layer_of(folder: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        if folder in members:
            return rank
    raise KeyError(folder)


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "ppo_cbp" / "plasticity" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import ppo_cbp.nets.units as u\n"
        "from ppo_cbp.nets import kernels\n"
        "from . import hooks\n"
        "from .cbp import ContinualBackprop\n"
        "if TYPE_CHECKING:\n"
        "    from ppo_cbp.train import Args\n"
        "def f():\n"
        "    from ppo_cbp.benchmarks.common import Learner\n"
    )
    known = {
        "ppo_cbp.nets",
        "ppo_cbp.nets.units",
        "ppo_cbp.nets.kernels",
        "ppo_cbp.plasticity",
        "ppo_cbp.plasticity.hooks",
        "ppo_cbp.plasticity.cbp",
        "ppo_cbp.train",
        "ppo_cbp.benchmarks",
        "ppo_cbp.benchmarks.common",
    }
    assert imports_of("ppo_cbp.plasticity.x", source, known) == {
        "ppo_cbp.nets.units",
        "ppo_cbp.nets.kernels",
        "ppo_cbp.plasticity.hooks",
        "ppo_cbp.plasticity.cbp",
        "ppo_cbp.train",
        "ppo_cbp.benchmarks.common",
    }


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_folders():
    cycle = find_cycle(folder_graph(graph()))
    assert cycle is None, "import cycle between folders: " + " -> ".join(cycle)


def test_every_folder_and_root_module_has_a_layer():
    folders = {folder_of(m) for m in modules()}
    placed = set().union(*(members for _, members in LAYERS))
    assert folders - placed == set(), "place these in LAYERS and docs/architecture.md"
    assert placed - folders == set(), "LAYERS names modules that do not exist"


def test_every_import_points_down():
    upward = [
        f"{module} ({LAYERS[layer_of(folder_of(module))][0]}) imports {target} "
        f"({LAYERS[layer_of(folder_of(target))][0]})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if layer_of(folder_of(target)) > layer_of(folder_of(module))
    ]
    assert upward == []


@pytest.mark.parametrize(
    "above",
    ["ppo_cbp.ppo", "ppo_cbp.benchmarks", "ppo_cbp.reporting", "ppo_cbp.train", "ppo_cbp.sweep"],
)
def test_plasticity_imports_no_trainer_benchmark_or_reporting(above):
    edges = graph()
    offenders = [
        (m, t)
        for m, targets in edges.items()
        if folder_of(m) == "ppo_cbp.plasticity"
        for t in targets
        if folder_of(t) == above
    ]
    assert offenders == []


def test_the_package_loads_no_code_by_file_path():
    """Library code never runs a script's code (scripts sit above the package)."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in modules().values()
        if "spec_from_file_location" in path.read_text()
    ]
    assert offenders == []


def test_at_most_twelve_modules_at_the_package_root():
    root_modules = [p.name for p in PACKAGE.glob("*.py")]
    assert len(root_modules) <= 12, root_modules


def test_pyproject_installs_every_folder_and_envs_under_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(config["packages"])
    folders = {
        "ppo_cbp." + str(p.parent.relative_to(PACKAGE)).replace("/", ".")
        for p in PACKAGE.rglob("__init__.py")
        if p.parent != PACKAGE
    }
    assert packages == {"ppo_cbp", "ppo_cbp.envs"} | folders
    assert config["package-dir"]["ppo_cbp.envs"] == "envs"
    assert not any(name == "envs" or name.startswith("envs.") for name in packages)
