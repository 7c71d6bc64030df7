"""The house rules, checked by parsing imports (docs/architecture.md draws them).

Layers, lowest first; an import may only point down, or stay inside its own room:

    base          traci_ml.core.*, traci_ml.proto.*      (config, data, wire, models ...)
    services      traci_ml.services.{broker,expert,reducer}.*  (one room each)
    applications  traci_ml.app.*, and the package root ``traci_ml`` (its public API)

Every import counts, also one inside a function (a lazy import hides a loop, it does not
break it), and rules hold through third modules: the closure of a module's imports is checked,
not only its own lines. Besides: the module graph has no cycle, the broker and the protocol
hold no model (no torch, however reached), model code has no sockets, and only the protocol
speaks msgpack.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("broker", "expert", "reducer")
# repository folder -> installed package (pyproject.toml's package-dir)
FOLDERS = {"traci_ml": "traci_ml", "proto": "traci_ml.proto", "services": "traci_ml.services"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [*FOLDERS[rel.parts[0]].split("."), *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    found = {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}
    assert len(found) > 50, "the layout test found too few modules"
    return found


def raw_imports(path: Path) -> set[str]:
    """Every dotted name imported anywhere in the file (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(path.read_text(), package, where=str(path))


def imports_in(source: str, package: str, where: str = "<source>") -> set[str]:
    """Every dotted name ``source`` imports, at any depth, for a module in ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from a import b``: the module a.b if there is one, else an attribute of a
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def internal(name: str, known: Iterable[str]) -> str | None:
    """The project module a dotted name lands in (its longest known prefix), or None."""
    known = set(known)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


@cache
def graph() -> dict[str, frozenset[str]]:
    """module -> the project modules it imports. ``from traci_ml import proto`` is an edge to
    ``traci_ml.proto``, not to the package root: importing a submodule runs its parents'
    ``__init__`` but not the root's lazy attributes."""
    mods = modules()
    edges: dict[str, frozenset[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in raw_imports(path):
            hit = internal(imported, mods) if imported.startswith("traci_ml") else None
            if hit and hit != name:
                targets.add(hit)
        edges[name] = frozenset(targets)
    return edges


def closure(start: str, edges: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Every module reachable from ``start``, each with one import path that reaches it."""
    paths: dict[str, list[str]] = {start: [start]}
    todo = [start]
    while todo:
        here = todo.pop()
        for nxt in edges.get(here, ()):
            if nxt not in paths:
                paths[nxt] = [*paths[here], nxt]
                todo.append(nxt)
    del paths[start]
    return paths


def layer(module: str) -> tuple[int, str]:
    """(layer, room): 0 base, 1 a service (room = its name), 2 an application."""
    if module.startswith(("traci_ml.core", "traci_ml.proto")):
        return 0, "base"
    if module.startswith("traci_ml.services."):
        return 1, module.split(".")[2]
    if module == "traci_ml.services":
        return 1, "services"
    return 2, "app"


def violations(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Each module that reaches, directly or through others, a module above its layer or
    another service's room; with the import path that does it."""
    found = []
    for module in sorted(edges):
        level, room = layer(module)
        if level == 2:
            continue
        for target, path in sorted(closure(module, edges).items()):
            t_level, t_room = layer(target)
            if t_level > level or (t_level == 1 and level == 1 and t_room != room):
                if room != "services" and t_room != "services":
                    found.append(" -> ".join(path))
    return found


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Import cycles (strongly connected sets of two or more modules)."""
    found = []
    for module in sorted(edges):
        reach = closure(module, edges)
        loop = [m for m in reach if module in closure(m, edges)]
        if loop and module == min([module, *loop]):
            found.append(sorted([module, *loop]))
    return found


# -- the checker can fail ---------------------------------------------------------------------


def test_the_checker_sees_a_layer_broken_through_a_third_module() -> None:
    edges = {
        "traci_ml.core.a": ["traci_ml.core.b"],
        "traci_ml.core.b": ["traci_ml.services.expert.x"],  # base -> service
        "traci_ml.services.expert.x": ["traci_ml.core.c"],
        "traci_ml.services.reducer.y": ["traci_ml.core.c", "traci_ml.core.a"],  # -> expert
        "traci_ml.services.broker.z": ["traci_ml.app.cli"],  # service -> app
        "traci_ml.core.c": [],
        "traci_ml.app.cli": ["traci_ml.services.broker.z"],  # fine: app is on top
    }
    got = violations(edges)
    assert "traci_ml.core.a -> traci_ml.core.b -> traci_ml.services.expert.x" in got
    assert "traci_ml.core.b -> traci_ml.services.expert.x" in got
    assert any(v.startswith("traci_ml.services.reducer.y") for v in got)  # via core.a
    assert "traci_ml.services.broker.z -> traci_ml.app.cli" in got
    assert not any(v.startswith("traci_ml.app") for v in got)
    assert cycles(edges) == [["traci_ml.app.cli", "traci_ml.services.broker.z"]]


def test_the_checker_reads_lazy_and_relative_imports() -> None:
    source = (
        "import numpy as np\n"
        "from . import rundir\n"
        "from ..app.cli import main\n"
        "def later():\n"
        "    if True:\n"
        "        from traci_ml.services.broker import service\n"
    )
    names = imports_in(source, "traci_ml.core")
    assert {"numpy.np", "traci_ml.core.rundir", "traci_ml.app.cli.main"} - names == {"numpy.np"}
    assert "numpy" in names
    assert "traci_ml.services.broker.service" in names


# -- the tree keeps the rules -----------------------------------------------------------------


def test_layers_point_down_and_services_never_reach_each_other() -> None:
    bad = violations(graph())
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    assert not cycles(graph())


def test_every_module_has_a_layer() -> None:
    rooms = {layer(m) for m in graph()}
    assert (0, "base") in rooms and (2, "app") in rooms
    assert {(1, s) for s in SERVICES} <= rooms


def test_every_package_is_installed() -> None:
    """pyproject's explicit package list names every package folder: a folder left out is
    missing from a non-editable install (the Docker image), while editable installs hide it."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert folders == listed, (
        f"not installed: {sorted(folders - listed)}; not a package: {sorted(listed - folders)}"
    )


def external(module: str) -> set[str]:
    """Top-level third-party/stdlib packages one module imports."""
    return {n.split(".")[0] for n in raw_imports(modules()[module]) if not n.startswith("traci_")}


@pytest.mark.parametrize("room", ["traci_ml.services.broker", "traci_ml.proto"])
def test_broker_and_protocol_reach_no_torch(room: str) -> None:
    edges = graph()
    for module in [m for m in edges if m == room or m.startswith(room + ".")]:
        reach = {module: [module], **closure(module, edges)}
        bad = [" -> ".join(p) for m, p in reach.items() if "torch" in external(m)]
        assert not bad, f"{module} reaches torch: {bad}"


@pytest.mark.parametrize("module", ["traci_ml.core.models.expert", "traci_ml.core.models.reducer"])
def test_model_code_has_no_sockets(module: str) -> None:
    edges = graph()
    reach = {module: [module], **closure(module, edges)}
    bad = [" -> ".join(p) for m, p in reach.items() if external(m) & {"zmq", "socket"}]
    assert not bad, f"{module} reaches sockets: {bad}"


def test_only_proto_uses_msgpack() -> None:
    for module in modules():
        if not module.startswith("traci_ml.proto"):
            assert "msgpack" not in external(module), f"{module} uses msgpack"


def test_no_environment_reads_outside_the_entry_points() -> None:
    # signals.py reads only TRACI_PARENT_PID (process plumbing from the launcher, not config)
    allowed = {
        "traci_ml/core/config.py",
        "traci_ml/app/launcher.py",
        "traci_ml/app/supervisor.py",
        "traci_ml/app/zygote.py",  # a forked service's environment (process plumbing)
        "traci_ml/core/tensors.py",
        "traci_ml/core/signals.py",
    }
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        if rel not in allowed:
            assert "os.environ" not in path.read_text(), f"{rel} reads os.environ"
