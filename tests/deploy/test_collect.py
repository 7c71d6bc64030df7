"""`traci collect`: a Kubernetes run's parts -- the reducer's run directory on its volume, each
expert's checkpoint and accounts on its own -- brought together into one run directory that
`traci predict` reads exactly as the run it was split from.

The cluster is played by a stand-in `kubectl` (--kubectl) that accepts only the one command
collect sends, `kubectl -n NS exec deploy/NAME -c ROLE -- tar cf - -C DIR LEAF`, and answers
it by running the real tar in that pod's folder; a Deployment that does not exist is answered
as the API server does. There is no Kubernetes API server on this machine."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.test_predict import make_run, read_out
from traci_ml.app.cli import main
from traci_ml.app.collect import CollectError, collect
from traci_ml.core.config import load_config
from traci_ml.core.errors import CheckpointError

pytestmark = pytest.mark.timeout(120)
FAKE_KUBECTL = r"""#!{python}
import os, subprocess, sys
argv = sys.argv[1:]
# -n NS exec deploy/NAME -c ROLE -- tar cf - -C DIR LEAF
ok = (len(argv) == 13 and argv[0] == "-n" and argv[2] == "exec" and argv[3].startswith("deploy/")
      and argv[4] == "-c" and argv[6:10] == ["--", "tar", "cf", "-"] and argv[10] == "-C")
if not ok:
    sys.exit(f"fake kubectl: unexpected {{argv}}")
ns, name, role, where, leaf = argv[1], argv[3][7:], argv[5], argv[11], argv[12]
pod = os.path.join(os.environ["FAKE_PODS"], ns, name)
if not os.path.isdir(pod):
    sys.exit(f'Error from server (NotFound): deployments.apps "{{name}}" not found')
if not os.path.isdir(os.path.join(pod, "containers", role)):
    sys.exit(f"error: container {{role}} not found in pod")
os.execvp("tar", ["tar", "cf", "-", "-C", pod + where, leaf])
"""
POD_RUNS = "var/lib/traci/runs"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """(the config the pods run with, the original run directory, the pods' folder): a small
    trained run split the way the pods hold it."""
    built = make_run(tmp_path / "orig" / "predict-test")
    original = built.path
    pods = tmp_path / "pods" / "traci"
    n = len(built.targets)
    for name in ["reducer", *(f"expert-{i}" for i in range(n))]:
        role = name.partition("-")[0]
        (pods / name / "containers" / role).mkdir(parents=True)
    reducer_run = pods / "reducer" / POD_RUNS / "predict-test"
    shutil.copytree(original, reducer_run)
    for i in range(n):  # each expert's own files leave the reducer's volume for its own
        run = pods / f"expert-{i}" / POD_RUNS / "predict-test"
        for rel in (f"checkpoints/expert-{i}.pt", f"experts/expert-{i}.json"):
            src = reducer_run / rel
            if src.exists():
                (run / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(src, run / rel)
    fake = tmp_path / "kubectl"
    fake.write_text(FAKE_KUBECTL.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_PODS", str(tmp_path / "pods"))
    config = built.config.model_copy(update={"run_dir": "runs/{run_id}"})
    return config, original, pods, str(fake)


def test_collected_run_predicts_like_the_run_it_came_from(cluster, tmp_path, capsys) -> None:
    config, original, _, kubectl = cluster
    config_file = tmp_path / "run.yaml"
    config_file.write_text((original / "config.json").read_text())  # JSON is YAML
    out = tmp_path / "collected"
    argv = ["collect", "--config", str(config_file), "--set", "run_dir=runs/{run_id}",
            "--kubectl", kubectl]  # fmt: skip
    assert main([*argv, "--out", str(out)]) == 0
    dest = out / "predict-test"
    assert f"collected {dest}" in capsys.readouterr().out
    n = len(list((original / "checkpoints").glob("expert-*.pt")))
    for i in range(n):
        assert (dest / "checkpoints" / f"expert-{i}.pt").read_bytes() == (
            original / "checkpoints" / f"expert-{i}.pt"
        ).read_bytes()
    answers = {}
    for run in (original, dest):
        path = tmp_path / f"{run.parent.name}.csv"
        assert main(["predict", "--run", str(run), "--split", "test", "--output", str(path)]) == 0
        answers[run] = read_out(path)
    assert answers[dest] == answers[original] and len(answers[dest]) > 10


def test_a_missing_deployment_names_itself(cluster, tmp_path) -> None:
    config, _, pods, kubectl = cluster
    shutil.rmtree(pods / "expert-1")
    with pytest.raises(CollectError, match=r"expert-1: kubectl exec exited 1: .*NotFound"):
        collect(config, tmp_path / "out", kubectl=kubectl)


def test_a_part_without_its_checkpoint_is_named(cluster, tmp_path) -> None:
    config, _, pods, kubectl = cluster
    (pods / "expert-0" / POD_RUNS / "predict-test" / "checkpoints" / "expert-0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"lacks expert-0\.pt"):
        collect(config, tmp_path / "out", kubectl=kubectl)


def test_members_cannot_escape_the_output_folder(cluster, tmp_path) -> None:
    """A hostile pod's tar with a link out of the folder is refused, nothing written outside."""
    config, _, pods, kubectl = cluster
    run = pods / "expert-0" / POD_RUNS / "predict-test"
    (run / "escape").symlink_to("/etc/passwd")
    (run / "up").symlink_to("../../../../..")
    with pytest.raises(CollectError, match="did not unpack"):
        collect(config, tmp_path / "out", kubectl=kubectl)
    assert not (tmp_path / "out" / "predict-test" / "escape").exists()


def test_collect_reads_the_run_where_the_pods_keep_it() -> None:
    from traci_ml.app.collect import pod_run_dir

    config = load_config(overrides={"run_id": "r7"}, env={})
    assert pod_run_dir(config) == "/var/lib/traci/runs/r7"
