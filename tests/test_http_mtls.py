"""Mutual TLS on ``traci http`` (``serve.http_tls_client_ca``): the rules, and the command
itself in front of the fake front door, REST and gRPC, with a client certificate of the
admitted CA, one of another CA, and none."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.front_door import MODEL, dog, spawn_http, wait_up
from traci_ml.app.http_auth import access_for
from traci_ml.core.config import Config, validate
from traci_ml.core.errors import ConfigError

pytestmark = pytest.mark.timeout(120)
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A server certificate for 127.0.0.1 / localhost; a CA and a client certificate it
    signed (alice); another CA and a client certificate it signed (mallory)."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("openssl missing; CI installs it with deploy/ci/install-tls.sh")
        pytest.skip("openssl missing")
    d = tmp_path / "pki"
    d.mkdir()
    f = {n: d / n for n in ("server.pem", "server.key", "ca.pem", "ca.key", "other.pem",
                            "other.key", "alice.pem", "alice.key", "mallory.pem",
                            "mallory.key")}  # fmt: skip
    openssl("req", "-x509", *EC, "-days", "2", "-subj", "/CN=localhost", "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(f["server.key"]),
            "-out", str(f["server.pem"]))  # fmt: skip
    ext = d / "client.ext"
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for ca, client in (("ca", "alice"), ("other", "mallory")):
        openssl("req", "-x509", *EC, "-days", "2", "-subj", f"/CN={ca}", "-addext",
                "basicConstraints=critical,CA:TRUE", "-addext",
                "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(f[f"{ca}.key"]),
                "-out", str(f[f"{ca}.pem"]))  # fmt: skip
        csr = d / f"{client}.csr"
        openssl("req", "-new", *EC, "-subj", f"/CN={client}", "-keyout", str(f[f"{client}.key"]),
                "-out", str(csr))  # fmt: skip
        openssl("x509", "-req", "-in", str(csr), "-CA", str(f[f"{ca}.pem"]), "-CAkey",
                str(f[f"{ca}.key"]), "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                "-out", str(f[f"{client}.pem"]))  # fmt: skip
    return f


def _serve(**serve) -> Config:
    return Config.model_validate({"serve": serve})


def test_client_ca_rules(tmp_path: Path, pki) -> None:
    tls = {"http_tls_cert": str(pki["server.pem"]), "http_tls_key": str(pki["server.key"])}
    with pytest.raises(ConfigError, match="serve.http_tls_client_ca needs serve.http_tls_cert"):
        validate({"serve": {"http_tls_client_ca": str(pki["ca.pem"])}})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for bad in (junk, tmp_path / "missing.pem"):
        with pytest.raises(ConfigError, match="serve.http_tls_client_ca"):
            access_for(_serve(**tls, http_tls_client_ca=str(bad)))
    # off loopback, client certificates stand in for tokens (TLS still needed)
    access = access_for(_serve(**tls, http_bind="0.0.0.0", http_tls_client_ca=str(pki["ca.pem"])))
    assert access.client_ca == str(pki["ca.pem"]) and not access.tokens
    assert access.uvicorn_ssl()["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="client certificates"):
        access_for(_serve(**tls, http_bind="0.0.0.0"))


def test_the_kubernetes_sidecar_with_client_certificates() -> None:
    """Client certificates lock the sidecar (no --insecure); kubelet's probes present none,
    so they check the port accepts."""
    from traci_ml.app.k8s_objects import http_container

    c = http_container(_serve(http_tls_cert="/etc/tls/cert.pem", http_tls_key="/etc/tls/key.pem",
                              http_tls_client_ca="/etc/tls/ca.pem"))  # fmt: skip
    assert "--insecure" not in c["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "http"}, probe


def https(port: int, path: str, pki, client: str | None, body: dict | None = None):
    """(status, JSON answer) of one HTTPS request presenting ``client``'s certificate."""
    context = ssl.create_default_context(cafile=str(pki["server.pem"]))
    if client is not None:
        context.load_cert_chain(pki[f"{client}.pem"], pki[f"{client}.key"])
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_traci_http_admits_only_certificates_of_its_ca(tmp_path: Path, door, pki) -> None:
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    proc, http_port, grpc_port = spawn_http(tmp_path, door, {
        "http_tls_cert": str(pki["server.pem"]), "http_tls_key": str(pki["server.key"]),
        "http_tls_client_ca": str(pki["ca.pem"])})  # fmt: skip
    try:
        wait_up(proc, lambda: https(http_port, "/v2/health/live", pki, "alice")[0] == 200)
        x = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
        body = {"inputs": [{"name": c, "datatype": "FP32", "shape": [2], "data": x[:, j].tolist()}
                           for j, c in enumerate("ab")]}  # fmt: skip
        code, answer = https(http_port, f"/v2/models/{MODEL}/infer", pki, "alice", body)
        assert code == 200, answer
        probs = np.array(answer["outputs"][0]["data"], np.float32).reshape(2, 2)
        np.testing.assert_allclose(probs, dog(x), rtol=1e-6)
        for client in (None, "mallory"):  # no certificate, or one another CA signed
            for path in (f"/v2/models/{MODEL}/infer", "/v2/health/live"):
                with pytest.raises(OSError):  # the handshake fails: no HTTP at all
                    https(http_port, path, pki, client, body if "infer" in path else None)

        def grpc_client(who: str | None) -> tc.InferenceServerClient:
            keys = {} if who is None else {"private_key": str(pki[f"{who}.key"]),
                                           "certificate_chain": str(pki[f"{who}.pem"])}  # fmt: skip
            roots = str(pki["server.pem"])
            return tc.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True,
                                            root_certificates=roots, **keys)  # fmt: skip

        inputs = [tc.InferInput(c, [2], "FP32") for c in "ab"]
        for j, i in enumerate(inputs):
            i.set_data_from_numpy(x[:, j].copy())
        with grpc_client("alice") as client:
            result = client.infer(MODEL, inputs)
            np.testing.assert_allclose(result.as_numpy("probabilities"), dog(x), rtol=1e-6)
        for who in (None, "mallory"):
            with grpc_client(who) as client:
                with pytest.raises(InferenceServerException):
                    client.infer(MODEL, inputs, client_timeout=5)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_rotated_tls_files_are_taken_without_a_restart(tmp_path: Path, door, pki) -> None:
    """cert-manager and Secret updates replace the files under a running server: traci http
    takes them for new connections (REST and gRPC) within seconds; a pair that does not load
    (the certificate of one key, the other key) is refused and the one in force stays."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    live = {"pem": tmp_path / "live.pem", "key": tmp_path / "live.key"}
    new = {"pem": tmp_path / "new.pem", "key": tmp_path / "new.key"}
    openssl("req", "-x509", *EC, "-days", "2", "-subj", "/CN=localhost", "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(new["key"]),
            "-out", str(new["pem"]))  # fmt: skip
    shutil.copy(pki["server.pem"], live["pem"])
    shutil.copy(pki["server.key"], live["key"])
    proc, http_port, grpc_port = spawn_http(tmp_path, door, {
        "http_tls_cert": str(live["pem"]), "http_tls_key": str(live["key"]),
        "http_tls_client_ca": str(pki["ca.pem"])})  # fmt: skip
    x = np.array([[0.5, -1.0]], np.float32)
    inputs = [tc.InferInput(c, [1], "FP32") for c in "ab"]
    for j, i in enumerate(inputs):
        i.set_data_from_numpy(x[:, j].copy())

    def rest(trust: Path) -> bool:
        pki_trusting = {**pki, "server.pem": trust}
        try:
            return https(http_port, "/v2/health/live", pki_trusting, "alice")[0] == 200
        except OSError:
            return False

    def grpc_ok(trust: Path) -> bool:
        alice = {"private_key": str(pki["alice.key"]), "certificate_chain": str(pki["alice.pem"])}
        with tc.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True,
                                      root_certificates=str(trust), **alice) as client:  # fmt: skip
            try:
                return client.infer(MODEL, inputs, client_timeout=5) is not None
            except InferenceServerException:
                return False

    def within(seconds: float, check) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + seconds
        while not check():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def replace(pem: Path, key: Path) -> None:  # each file swapped whole, as a Secret update
        for src, dst in ((key, live["key"]), (pem, live["pem"])):
            shutil.copy(src, tmp_path / "swap")
            os.replace(tmp_path / "swap", dst)

    try:
        assert within(60, lambda: rest(pki["server.pem"])), "traci http never came up"
        assert grpc_ok(pki["server.pem"]) and not rest(new["pem"]) and not grpc_ok(new["pem"])
        replace(new["pem"], new["key"])
        assert within(10, lambda: rest(new["pem"])), "REST kept the old certificate"
        assert within(10, lambda: grpc_ok(new["pem"])), "gRPC kept the old certificate"
        assert not rest(pki["server.pem"])
        replace(pki["server.pem"], new["key"])  # a certificate and a key that do not match
        time.sleep(2.5)  # looked at once a second
        assert rest(new["pem"]) and grpc_ok(new["pem"]), "a broken pair replaced a good one"
        assert proc.poll() is None
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "TLS files changed: taken" in out and "do not load" in out, out
