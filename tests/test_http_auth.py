"""Who may use `traci http` (app/http_auth.py): bearer tokens on every request but the health
checks, TLS on both sides, and no listening off loopback without both unless --insecure.
The live tests run the command itself (REST and gRPC in one process) in front of the fake
front door, and ask it as outsiders would: no token, a wrong one, another scheme, then the
right one, with a plain HTTPS client and tritonclient.grpc over TLS."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.front_door import MODEL, dog, spawn_http, wait_up
from traci_ml.app.http_auth import MIN_TOKEN, Access, access_for, load_tokens
from traci_ml.core.config import Config, validate
from traci_ml.core.errors import ConfigError

pytestmark = pytest.mark.timeout(120)
TOKEN = "t0k3n-" + "a" * 26
OTHER = "other-token-" + "b" * 20


def _config(**serve) -> Config:
    return Config.model_validate({"serve": serve})


def test_tokens_file_rules(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# who has which\n\n{TOKEN}\n  {OTHER}  \n")
    assert load_tokens(str(f)) == (TOKEN.encode(), OTHER.encode())
    f.write_text("short\n")
    with pytest.raises(ConfigError, match=rf"serve.http_token_file: .* line 1: .*{MIN_TOKEN}"):
        load_tokens(str(f))
    f.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="serve.http_token_file: .* holds no token"):
        load_tokens(str(f))
    with pytest.raises(ConfigError, match="serve.http_token_file: cannot read"):
        load_tokens(str(tmp_path / "absent"))


def test_tls_files_go_together_and_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="serve.http_tls_cert and serve.http_tls_key"):
        validate({"serve": {"http_tls_cert": "cert.pem"}})
    with pytest.raises(ConfigError, match=r"serve.http_tls_cert: .*cert.pem is not a readable"):
        access_for(_config(http_tls_cert=str(tmp_path / "cert.pem"), http_tls_key="k"))


def test_a_certificate_and_key_that_do_not_load_are_named(tmp_path: Path, pki) -> None:
    cert, key = pki
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    other = tmp_path / "other.pem"
    other.write_bytes(key.read_bytes().replace(b"\n", b"\n\n", 1)[:40])  # a broken key
    for c, k in ((junk, key), (cert, other), (cert, cert)):
        with pytest.raises(ConfigError, match="serve.http_tls_cert / serve.http_tls_key: .* not"):
            access_for(_config(http_tls_cert=str(c), http_tls_key=str(k)))
    assert access_for(_config(http_tls_cert=str(cert), http_tls_key=str(key))).tls


def test_off_loopback_needs_tls_and_tokens_or_insecure(tmp_path: Path, pki) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    cert, key = pki
    for bind in ("0.0.0.0", "10.1.2.3", "::", "my-host"):
        with pytest.raises(ConfigError, match=rf"refusing .* on {bind} without TLS .* --insecure"):
            access_for(_config(http_bind=bind))
    with pytest.raises(ConfigError, match=r"without TLS \(serve.http_tls_cert.*read the tokens"):
        access_for(_config(http_bind="0.0.0.0", http_token_file=str(tokens)))
    with pytest.raises(ConfigError, match=r"without tokens \(serve.http_token_file\)"):
        access_for(_config(http_bind="0.0.0.0", http_tls_cert=str(cert), http_tls_key=str(key)))
    both = access_for(_config(http_bind="0.0.0.0", http_tls_cert=str(cert),
                              http_tls_key=str(key), http_token_file=str(tokens)))  # fmt: skip
    assert both.tls and both.tokens == (TOKEN.encode(),)
    loose = Config.model_validate({"serve": {"http_bind": "0.0.0.0"},
                                   "security": {"insecure": True}})  # fmt: skip
    assert access_for(loose) == Access()  # --insecure: as asked, warned in the log
    for bind in ("127.0.0.1", "localhost", "::1"):
        assert not access_for(_config(http_bind=bind)).tokens  # loopback: as before


def test_a_token_is_a_listed_bearer_token() -> None:
    access = Access((TOKEN.encode(), OTHER.encode()))
    assert access.allows(f"Bearer {TOKEN}") and access.allows(f"bearer  {OTHER} ".encode())
    for bad in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                "Bearer ", "Bearer \udcff"):  # fmt: skip
        assert not access.allows(bad), bad
    assert Access().allows(None)  # no tokens asked: everyone, as before
    message = access.refuse("POST /v2/models/toy/infer", has_header=True)
    assert access.refused == 1 and "serve.http_token_file" in message and "not listed" in message


def test_a_changed_token_file_is_taken_without_a_restart(tmp_path: Path, caplog) -> None:
    """Revoking a token is editing the file: looked at again at most every RELOAD_EVERY s; a
    file that no longer loads (a short token, no token, gone) keeps the tokens in force."""
    from traci_ml.app.http_auth import RELOAD_EVERY

    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    access = access_for(_config(http_token_file=str(path)))
    t = time.monotonic()
    assert access.allows(f"Bearer {TOKEN}") and not access.allows(f"Bearer {OTHER}")
    path.write_text(f"# {TOKEN} revoked\n{OTHER}\n")
    access.reload(now=t)  # within RELOAD_EVERY of the last look: not yet
    assert access.tokens == (TOKEN.encode(),)
    t += RELOAD_EVERY + 0.01
    access.reload(now=t)
    assert access.tokens == (OTHER.encode(),) and access.reloads == 1
    for broken in ("short\n", "# none left\n", None):
        if broken is None:
            path.unlink()
        else:
            path.write_text(broken)
        t += RELOAD_EVERY + 0.01
        access.reload(now=t)
        assert access.tokens == (OTHER.encode(),), broken
    assert "token(s) in force stay" in caplog.text and "line 1" in caplog.text
    path.write_text(f"{TOKEN}\n{OTHER}\n")  # back: taken again
    access.reload(now=t + RELOAD_EVERY + 0.01)
    assert access.tokens == (TOKEN.encode(), OTHER.encode()) and access.reloads == 2


def test_traci_http_refuses_a_public_bind_before_listening(tmp_path: Path) -> None:
    """One line naming the keys and --insecure, the config-error exit code, nothing bound."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "metrics": {"broker_port": 0},
                               "serve": {"http_bind": "0.0.0.0", "http_port": 18080}}))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "traci_ml.app.cli", "http", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "refusing" in line]
    assert len(errors) == 1 and "serve.http_token_file" in errors[0] and "--insecure" in errors[0]
    assert "Traceback" not in proc.stderr


# -- live: the command, TLS and tokens, REST and gRPC -----------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("openssl missing; CI installs it with deploy/ci/install-tls.sh")
        pytest.skip("openssl missing")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return cert, key


def https_call(port: int, path: str, cafile: Path, auth: str | None = None,
               body: dict | None = None):  # fmt: skip
    """(status, JSON answer, headers) of one HTTPS request to 127.0.0.1:``port`` trusting
    ``cafile``; ``auth``: the Authorization header, if any."""
    headers = {"Authorization": auth} if auth else {}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=data, headers=headers)
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def test_tls_and_tokens_on_both_sides(tmp_path: Path, door, pki) -> None:
    import grpc
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    cert, key = pki
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{OTHER}\n")
    proc, http_port, grpc_port = spawn_http(tmp_path, door, {
        "http_tls_cert": str(cert), "http_tls_key": str(key), "http_token_file": str(tokens),
        "http_read_timeout": 2.0})  # fmt: skip
    try:  # the health checks need no token
        wait_up(proc, lambda: https_call(http_port, "/v2/health/live", cert)[0] == 200)
        x = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
        body = {"inputs": [{"name": c, "datatype": "FP32", "shape": [2], "data": x[:, j].tolist()}
                           for j, c in enumerate("ab")]}  # fmt: skip
        infer = f"/v2/models/{MODEL}/infer"
        for token in (None, OTHER + "x", "not-a-listed-token-at-all"):
            auth = f"Bearer {token}" if token else None
            code, answer, headers = https_call(http_port, infer, cert, auth, body)
            assert code == 401 and "unauthorized" in answer["error"], (token, answer)
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert https_call(http_port, f"/v2/models/{MODEL}", cert)[0] == 401  # metadata too
        code, answer, _ = https_call(http_port, infer, cert, f"Bearer {OTHER}", body)
        assert code == 200, answer
        probs = np.array(answer["outputs"][0]["data"], np.float32).reshape(2, 2)
        np.testing.assert_allclose(probs, dog(x), rtol=1e-6)
        idle = ssl.create_default_context(cafile=str(cert)).wrap_socket(
            socket.create_connection(("127.0.0.1", http_port), timeout=10),
            server_hostname="localhost")  # fmt: skip
        with idle:  # a TLS client that then sends nothing: closed at serve.http_read_timeout
            t = time.monotonic()
            assert idle.recv(100) == b"" and time.monotonic() - t < 8
        with pytest.raises(OSError):  # plaintext to the TLS port: no answer
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=5)

        client = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True,
                                          root_certificates=str(cert))  # fmt: skip
        try:
            assert client.is_server_live()  # open without a token
            inputs = [tc.InferInput(c, [2], "FP32") for c in "ab"]
            for j, i in enumerate(inputs):
                i.set_data_from_numpy(x[:, j].copy())
            with pytest.raises(InferenceServerException, match="unauthorized"):
                client.infer(MODEL, inputs)
            with pytest.raises(InferenceServerException, match="unauthorized"):
                client.get_model_metadata(MODEL, headers={"authorization": f"Bearer {OTHER}x"})
            result = client.infer(MODEL, inputs, headers={"authorization": f"Bearer {TOKEN}"})
            np.testing.assert_allclose(result.as_numpy("probabilities"), dog(x), rtol=1e-6)
            tokens.write_text(f"{OTHER}\n")  # revoke TOKEN, no restart
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.infer(MODEL, inputs, headers={"authorization": f"Bearer {TOKEN}"})
                except InferenceServerException as exc:
                    assert "unauthorized" in str(exc)
                    break
                assert time.monotonic() < deadline, "a revoked token still answered"
                time.sleep(0.2)
            code, answer, _ = https_call(http_port, infer, cert, f"Bearer {TOKEN}", body)
            assert code == 401, answer  # REST shares the tokens
            assert https_call(http_port, infer, cert, f"Bearer {OTHER}", body)[0] == 200
        finally:
            client.close()
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc

        tls = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", tls) as channel:  # a stream too
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name=MODEL)])))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.ServerReady(pb.ServerReadyRequest()).ready is not None
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as plain:  # no TLS: no answer
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(plain).result(timeout=3)
        assert proc.poll() is None  # nothing above ended it
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "refused" in out and "no bearer token" in out  # the refusals were logged


def test_the_sidecars_two_key_files_reach_a_curve_front_door(tmp_path: Path) -> None:
    """What the Kubernetes sidecar mounts under CURVE (components/curve: broker.key and
    client.key_secret, nothing else) is enough for `traci http` to ask a CURVE front door;
    without keys, or with a listed key of another role, it gets no answer."""
    from tests.helpers.front_door import FrontDoor, make_translator
    from traci_ml.app.oip import Translator
    from traci_ml.core.errors import ServeError
    from traci_ml.core.security import broker_keys, generate, peer_keys

    keys = tmp_path / "keys"
    generate(keys, 1)
    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    for name in ("broker.key", "client.key_secret"):
        shutil.copy(keys / name, sidecar / name)
    server = broker_keys(Config.model_validate({"security": {"curve_dir": str(keys)}}))
    door = FrontDoor(curve=server)
    plain = make_translator(tmp_path / "run", door)
    try:

        def asking(curve_dir: Path, name: str) -> Translator:
            config = plain.config.model_copy(update={"security": plain.config.security.model_copy(
                update={"curve_dir": str(curve_dir)})})  # fmt: skip
            return Translator(config, door.endpoint, curve=peer_keys(config, name))

        x = {"a": np.array([0.5, 2.0], np.float32), "b": np.array([-1.0, 3.0], np.float32)}
        tr = asking(sidecar, "client")
        outputs, _ = tr.predict(x, None, timeout=5.0)
        np.testing.assert_array_equal(outputs["probabilities"], dog(np.stack([x["a"], x["b"]], 1)))
        tr.close()
        wrong_role = asking(keys, "expert-0")  # a listed key, but not the front door's
        for tr in (plain, wrong_role):
            with pytest.raises(ServeError):
                tr.predict(x, None, timeout=1.0)
            tr.close()
    finally:
        door.close()


def test_the_kubernetes_sidecar_is_insecure_only_without_tls_and_tokens() -> None:
    """The pod's address is off loopback: `traci deploy k8s` adds --insecure to the sidecar
    unless the three keys are set, and then probes over HTTPS (the probes need no token)."""
    from traci_ml.app.k8s_objects import http_container

    plain = http_container(Config.model_validate({}))
    assert "--insecure" in plain["args"] and "scheme" not in plain["readinessProbe"]["httpGet"]
    locked = http_container(_config(http_tls_cert="/etc/tls/cert.pem",
                                    http_tls_key="/etc/tls/key.pem",
                                    http_token_file="/etc/tls/tokens"))  # fmt: skip
    assert "--insecure" not in locked["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert locked[probe]["httpGet"]["scheme"] == "HTTPS"


def test_traci_serve_refuses_a_public_http_bind_before_starting_anything(tmp_path: Path) -> None:
    """`traci serve` checks traci http's rules itself, first: one line, exit 2, no child."""
    from traci_ml.app import serving

    config = Config.model_validate({"run_dir": str(tmp_path / "run"),
                                    "serve": {"http_bind": "0.0.0.0"}})  # fmt: skip
    with pytest.raises(ConfigError, match="refusing to serve the Open Inference Protocol"):
        serving.serve(config)
    assert not (tmp_path / "run").exists()  # no serve.yaml, no logs: nothing started
    off = Config.model_validate({"run_dir": str(tmp_path / "run"),
                                 "serve": {"http_bind": "0.0.0.0", "http_port": 0}})  # fmt: skip
    with pytest.raises(Exception, match="train the run first"):  # REST off: not asked
        serving.serve(off)
