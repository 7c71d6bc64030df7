"""``traci deploy compose CONFIG``: the Docker Compose stack of one run, generated from its config.

One expert service per data view (expert *i* serves metrics on ``metrics.expert_base_port + i``),
the broker, the reducer, Prometheus scraping exactly those services, Grafana, and the
overrides (CPU image, one GPU per expert, CurveZMQ keys per role, the CI test's loopback
variant) for exactly those experts. A run with its own files gets:

* ``run.yaml``: the config with every data path rewritten to where the container sees it
  (``/var/lib/traci/data/...``); the services read it as their config;
* per-service read-only bind mounts of only what that service reads: with ``data.source:
  parties`` expert *i* its own file, the reducer the labels; with one ``csv`` table the
  reducer and every expert the table (each reads it whole in that mode). The broker reads
  no data file;
* the user's expert modules (``model.module`` outside ``traci_ml``) mounted read-only under
  ``/opt/traci/user`` with ``PYTHONPATH`` set, on the experts that use them.

The files in ``deploy/`` are this generator's output for ``examples/digits.yaml`` (``traci
deploy compose examples/digits.yaml --out deploy``; tests/deploy/test_generate.py keeps them
identical). Host paths are written relative to the output folder, so it moves with the data.
No sockets here; nothing is started.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from traci_ml.app.compose_text import USER, Stack, render
from traci_ml.core.config import Config, load_config
from traci_ml.core.data import expert_count
from traci_ml.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]  # a TRACI checkout: deploy/, the Dockerfile
DEPLOY = REPO / "deploy"
DATA = "/var/lib/traci/data"  # where the containers see the run's files
RUN_HEADER = (
    "# Written by `traci deploy compose` from the run's config: the same run, with every data\n"
    "# path where the containers see it (the compose file mounts each file there).\n"
)


# ---- from the config ---------------------------------------------------------------------


@dataclass(frozen=True)
class DataFile:
    """A file one service of the run reads: ``service`` ("reducer", "expert-<i>"), the host
    path, and where the config names it: ``("labels",)``, ``("views", i)`` or ``()`` (the one
    table, ``data.path``)."""

    service: str
    host: str
    key: tuple[Any, ...]

    @property
    def name(self) -> str:
        return Path(self.host).name


def data_files(config: Config) -> list[DataFile]:
    """Who reads which file: with ``parties`` the reducer the labels and expert *i* its own
    file; with one ``csv`` table the reducer and every expert the table (each reads it whole
    in that mode). The broker reads none. Every file must exist (from the working directory,
    as ``traci up`` reads it)."""
    d = config.data
    if d.source == "parties":
        assert d.labels is not None and isinstance(d.views, list)
        files = [DataFile("reducer", d.labels.path, ("labels",))]
        files += [DataFile(f"expert-{i}", str(v.path), ("views", i)) for i, v in enumerate(d.views)]
    elif d.source == "csv":
        readers = ("reducer", *(f"expert-{i}" for i in range(expert_count(config))))
        files = [DataFile(service, str(d.path), ()) for service in readers]
    else:
        return []
    for f in files:
        if not Path(f.host).is_file():
            raise ConfigError(f"{f.host}: no such file (paths are read from the working "
                              f"directory, {Path.cwd()})")  # fmt: skip
    return files


def run_config_with(config: Config, files: list[DataFile], target: Callable[[DataFile], str]):
    """The run config as a dict, each file's path replaced by ``target(file)``."""
    raw = config.model_dump(mode="json", exclude_none=True)
    for f in files:
        node = raw["data"]
        for k in f.key:
            node = node[k]
        node["path"] = target(f)
    return raw


def _container_path(f: DataFile) -> str:
    sub = {(): "table", ("labels",): "labels"}.get(f.key, f.service)
    return f"{DATA}/{sub}/{f.name}"


def stack_for(config: Config, config_path: Path, out: Path) -> tuple[Stack, dict]:
    """(the Stack, the containers' run config, or {} when ``config_path`` serves as it is)
    of ``config`` written to folder ``out``."""
    out = out.resolve()
    rel = lambda p: os.path.relpath(Path(p).resolve(), out)  # noqa: E731
    shipped = out == DEPLOY.resolve()
    n = expert_count(config)
    where = os.path.relpath(out)
    where = str(out) if where.startswith("..") else where
    stack = Stack(n=n, config_ref=rel(config_path), context=rel(REPO),
                  keys=rel(REPO / "keys") if shipped else "./keys", where=where,
                  config_arg=str(config_path),
                  keys_arg="keys/" if shipped else f"{where}/keys/",
                  broker_port=config.metrics.broker_port, reducer_port=config.metrics.reducer_port,
                  expert_base=config.metrics.expert_base_port)  # fmt: skip
    files = data_files(config)
    for f in files:
        stack.mounts.setdefault(f.service, []).append(f"{rel(f.host)}:{_container_path(f)}:ro")
    for i in range(n):
        host = user_module(config, i)
        if host is not None:
            stack.mounts.setdefault(f"expert-{i}", []).append(f"{rel(host)}:{USER}/{host.name}:ro")
            stack.pythonpath.add(f"expert-{i}")
    if not files and not stack.pythonpath:
        return stack, {}
    stack.config_ref = "./run.yaml"
    return stack, run_config_with(config, files, _container_path)


def user_modules(config: Config) -> list[Path]:
    """The host folders (or files) of every expert's own module, once each."""
    found = (user_module(config, i) for i in range(expert_count(config)))
    return sorted({m for m in found if m is not None})


def user_module(config: Config, expert_id: int) -> Path | None:
    """The host folder (a package) or file (a module) of expert ``expert_id``'s model module
    when it is the user's, found from the working directory as ``traci up`` finds it; None
    for a built-in net."""
    spec_text = config.expert_model(expert_id).module
    if not spec_text:
        return None
    top = spec_text.split(":")[0].split(".")[0]
    if top == "traci_ml":
        return None
    sys.path.insert(0, str(Path.cwd()))
    try:
        spec = importlib.util.find_spec(top)
    finally:
        sys.path.pop(0)
    if spec is None:
        raise ConfigError(f"{config.expert_model_key(expert_id)}.module {spec_text!r}: {top!r} "
                          f"is not importable from {Path.cwd()}")  # fmt: skip
    if spec.submodule_search_locations:  # a package (a namespace package too): its folder
        return Path(next(iter(spec.submodule_search_locations)))
    assert spec.origin is not None
    return Path(spec.origin)  # a module file


# ---- writing -----------------------------------------------------------------------------


def generate(config_path: Path, out: Path) -> list[Path]:
    """Write the stack of the run config at ``config_path`` into ``out``; returns the files
    written."""
    config = load_config(config_path, env={})
    out.mkdir(parents=True, exist_ok=True)
    stack, run_config = stack_for(config, config_path, out)
    files = render(stack)
    if run_config:
        files["run.yaml"] = RUN_HEADER + yaml.safe_dump(run_config, sort_keys=False)
    written = write_files(out, files)
    if out.resolve() != DEPLOY.resolve():  # the monitoring config the stack mounts
        for part in ("prometheus/rules", "grafana"):
            shutil.copytree(DEPLOY / part, out / part, dirs_exist_ok=True)
    return written


def write_files(out: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` (path relative to ``out`` -> text); returns the paths written."""
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
