"""``traci collect --config CONFIG --out DIR``: one usable run directory out of a Kubernetes
cluster.

On Kubernetes every process keeps its part of the run on its own volume: the reducer its
checkpoint, metrics and summary, expert *i* its checkpoint and accounts. ``traci collect``
streams each part out of the serving Deployments (``overlays/*-serve``: their pods mount
the volumes the training Jobs wrote) with ``kubectl exec deploy/<name> -- tar``, merges them
into ``DIR/<run_id>`` (the experts' parts first, then the reducer's), and checks that every
checkpoint ``traci predict`` and ``traci export`` need is there. Members are extracted with
tarfile's ``data`` filter: no absolute paths, no ``..``, no links out of the folder.

Compose needs no collect: its services share one volume (``docker compose cp``,
deploy/README.md). A ``parties`` run collected this way has every party's weights but no
party's data: it is served from the cluster (docs/parties.md).
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from traci_ml.app.k8s_objects import names
from traci_ml.core.config import Config
from traci_ml.core.data import expert_count
from traci_ml.core.errors import CheckpointError, TraciError
from traci_ml.core.rundir import RunDir

WORKDIR = "/var/lib/traci"  # the pods' working directory (k8s_objects.py)


class CollectError(TraciError):
    """kubectl could not read a part of the run."""


def pod_run_dir(config: Config) -> str:
    """Where the pods keep the run directory (run_dir is relative to their working dir)."""
    return posixpath.join(WORKDIR, config.run_path.as_posix())


def collect(config: Config, out: Path, *, namespace: str = "traci", kubectl: str = "kubectl",
            timeout: float = 600.0) -> Path:  # fmt: skip
    """Copy every process's part of the run into ``out/<run_id>``; returns that folder."""
    n = expert_count(config)
    parent, leaf = posixpath.split(pod_run_dir(config).rstrip("/"))
    dest = Path(out) / config.run_id
    procs = [p for p in names(n) if p[0] != "broker"]
    procs.sort(key=lambda p: p[0] == "reducer")  # the reducer's files last: its copy wins
    with tempfile.TemporaryDirectory(prefix="traci-collect-") as tmp:
        for role, name, _ in procs:
            argv = [kubectl, "-n", namespace, "exec", f"deploy/{name}", "-c", role, "--",
                    "tar", "cf", "-", "-C", parent, leaf]  # fmt: skip
            try:
                proc = subprocess.run(argv, capture_output=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CollectError(f"{name}: {' '.join(argv[:5])}: {exc}") from None
            if proc.returncode != 0:
                said = proc.stderr.decode(errors="replace").strip().splitlines()
                raise CollectError(
                    f"{name}: kubectl exec exited {proc.returncode}"
                    + (f": {said[-1]}" if said else "")
                    + f" (is overlays/*-serve applied and deploy/{name} running?)"
                )
            part = Path(tmp) / name
            part.mkdir()
            try:
                with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
                    tar.extractall(part, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise CollectError(f"{name}: its run directory did not unpack: {exc}") from None
            got = part / leaf
            if not got.is_dir():
                raise CollectError(f"{name}: sent no {leaf}/ (found {sorted(os.listdir(part))})")
            shutil.copytree(got, dest, dirs_exist_ok=True)
    missing = RunDir(dest).missing_checkpoints(n)
    if missing:
        raise CheckpointError(
            f"collected {dest}, but it lacks {', '.join(missing)}: has that process finished "
            "training (its Job complete)?"
        )
    return dest
