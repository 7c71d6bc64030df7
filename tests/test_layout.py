"""The house rules, checked by parsing imports: services never import each other, the broker
and the protocol hold no model (no torch), and model code has no sockets (no zmq)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("broker", "expert", "reducer")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(folder: str) -> list[Path]:
    found = sorted((ROOT / folder).rglob("*.py"))
    assert found, f"no python files under {folder}"
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service: str) -> None:
    others = [f"traci_ml.services.{s}" for s in SERVICES if s != service]
    for path in files(f"services/{service}"):
        bad = [m for m in imports_of(path) if any(m.startswith(o) for o in others)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("folder", ["services/broker", "proto"])
def test_broker_and_protocol_import_no_torch(folder: str) -> None:
    for path in files(folder):
        bad = [
            m
            for m in imports_of(path)
            if m.split(".")[0] == "torch"
            or m.startswith("traci_ml.core.tensors")
            or m.startswith("traci_ml.core.checkpoint")
        ]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize(
    "path", ["traci_ml/core/models/expert.py", "traci_ml/core/models/reducer.py"]
)
def test_model_code_has_no_sockets(path: str) -> None:
    bad = [m for m in imports_of(ROOT / path) if m.split(".")[0] in ("zmq", "socket")]
    assert not bad, f"{path} imports {bad}"


def test_only_proto_uses_msgpack() -> None:
    for folder in ("services", "traci_ml"):
        for path in files(folder):
            assert "msgpack" not in imports_of(path), f"{path.relative_to(ROOT)} uses msgpack"


def test_no_environment_reads_outside_the_entry_points() -> None:
    # signals.py reads only TRACI_PARENT_PID (process plumbing from the launcher, not config)
    allowed = {
        "traci_ml/core/config.py",
        "traci_ml/app/launcher.py",
        "traci_ml/core/tensors.py",
        "traci_ml/core/signals.py",
    }
    for folder in ("services", "traci_ml", "proto"):
        for path in files(folder):
            rel = str(path.relative_to(ROOT))
            if rel not in allowed:
                assert "os.environ" not in path.read_text(), f"{rel} reads os.environ"
