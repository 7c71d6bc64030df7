"""Every shell command in README.md and docs/tutorial.md runs as written (issue 14, item 7).

The commands are read from the documents themselves: every line of every fenced ``sh``
(``bash``, ``shell``, ``console``) block, in document order, so a command added later is run
too and a command that changes is run as changed. Each document's commands run one after the
other in one shell, as a user would type them into one terminal (a ``cd``, a variable or a
background job ``&`` stays for the next line), in a fresh copy of the repository:

- the copy is the working tree's files that git knows (tracked, and new ones not ignored),
  copied into a temporary directory: what a user has after a clone of this tree, without
  ``runs/`` or any other ignored output;
- the virtual environment is the repository's own ``.venv``, symlinked into the copy and
  activated (its ``bin`` first on ``PATH``, ``VIRTUAL_ENV`` set), as the tutorial says
  ("``.venv/bin/traci``, or activate the venv"): a second install per test run would take
  minutes and the network. ``make install`` is therefore already satisfied: the copy's
  ``pyproject.toml`` is dated before the venv's stamp (``.venv/.installed``), so ``make``
  itself finds nothing to do and never reinstalls into the shared venv;
- every port a command would bind gets a free one through the ``TRACI_*`` environment
  variables the docs describe (README "Running"), because other test runs share this
  machine; the commands themselves are not touched.

A command must exit 0 (or what ``EXIT_CODES`` says its document says it exits with), and
``check`` looks for what the docs say it produces (the run's ``summary.json`` and plots, the
file an export or a prediction writes, ...). Commands that cannot finish by design are left
out by ``EXCLUDED``, each with its reason; ``make test`` is one of them (it would run this
test again). Every failure names the document, the line and the command.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bench.e2e import free_port_block

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "docs/tutorial.md")
SHELL_BLOCKS = {"sh", "bash", "shell", "console", "shell-session", "zsh"}

# Commands left out, by their text (the trailing comment dropped, spaces collapsed), and why.
# Only commands that cannot finish by design; a doc that no longer holds one fails the test,
# so this list never outlives the command it excuses.
EXCLUDED = {
    "make test": "runs the whole test suite, this test included: it would recurse",
    "traci broker --config examples/digits.yaml": (
        "a long-running service meant for its own terminal or container (README: 'exactly "
        "what a container runs'); typed in order in one shell the broker never returns"
    ),
    "traci reducer --config examples/digits.yaml": (
        "one of the three services of the block above, each meant for its own terminal; "
        "alone it waits for experts that never come"
    ),
    "traci expert --config examples/digits.yaml --id 0": (
        "one of the three services of the block above, each meant for its own terminal; "
        "alone it waits for a broker that never comes"
    ),
    "tensorboard --logdir runs/digits/tensorboard": "a web server that runs until Ctrl-C",
    "mlflow ui --backend-store-uri sqlite:///runs/digits/mlflow/mlflow.db": (
        "a web server that runs until Ctrl-C (and needs the full mlflow package, which the "
        "venv does not carry: the comment says so)"
    ),
}

# A command the docs say exits with something other than 0: its text -> that code.
EXIT_CODES: dict[str, int] = {}

# Seconds one command may take (a training run on this busy 2-core machine is the longest).
COMMAND_TIMEOUT = 420
# Seconds the background jobs a document started may take to end after its last command.
JOBS_TIMEOUT = 60


@dataclass(frozen=True)
class Command:
    doc: str
    line: int  # 1-based line of the document
    text: str  # as written, with its comment
    key: str  # without the comment, spaces collapsed: what EXCLUDED and EXIT_CODES name

    def where(self) -> str:
        return f"{self.doc}:{self.line}: `{self.text}`"


def strip_comment(line: str) -> str:
    """The line without its shell comment (a ``#`` at a word's start, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_commands(doc: str, text: str) -> list[Command]:
    """The commands of every fenced shell block of a markdown document, in order: one per
    line (a trailing backslash joins the next), blank and comment-only lines left out; in a
    ``console`` block only the ``$ `` lines, without the prompt."""
    commands: list[Command] = []
    fence: str | None = None
    lang = ""
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if fence is None:
            m = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence, lang = m.group(1), m.group(2).lower()
            continue
        if stripped.startswith(fence) and not stripped[len(fence) :].strip():
            fence = None
            continue
        if lang not in SHELL_BLOCKS:
            continue
        line = raw.rstrip()
        if lang in ("console", "shell-session") and pending is None:
            if not line.lstrip().startswith("$ "):
                continue
            line = line.lstrip()[2:]
        if pending is not None:
            start, line = pending[0], pending[1] + "\n" + line
        else:
            start = number
        if line.endswith("\\"):
            pending = (start, line)
            continue
        pending = None
        key = " ".join(strip_comment(line).split())
        if key:
            commands.append(Command(doc, start, line.strip(), key))
    return commands


def document_commands(doc: str) -> list[Command]:
    return shell_commands(doc, (ROOT / doc).read_text())


# -- the user's checkout --------------------------------------------------------------------


def user_checkout(dest: Path) -> Path:
    """The working tree's files git knows (tracked, and new ones it does not ignore) copied
    to ``dest``, with the repository's venv linked in (see the module docstring)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = ROOT / name
        if not src.is_file() or src.is_symlink():  # deleted in the tree, or a link
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    venv = ROOT / ".venv"
    stamp = venv / ".installed"
    if not stamp.exists():
        pytest.fail(f"{stamp} is missing: run `make install` in {ROOT} first")
    (dest / ".venv").symlink_to(venv)
    # `make install` is satisfied: the stamp is newer than the copy's pyproject.toml
    before = stamp.stat().st_mtime - 60
    os.utime(dest / "pyproject.toml", (before, before))
    return dest


def user_environment(checkout: Path) -> dict[str, str]:
    """The activated venv, and every port a free one (TRACI_* variables, docs/config.md)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACI_")}
    env.pop("PYTHONPATH", None)
    env["VIRTUAL_ENV"] = str(checkout / ".venv")
    env["PATH"] = f"{checkout / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    base = free_port_block(16)
    ports = {
        "NETWORK__EXPERT_PORT": base,
        "NETWORK__REDUCER_PORT": base + 1,
        "NETWORK__SERVE_PORT": base + 2,
        "SERVE__HTTP_PORT": base + 3,
        "METRICS__BROKER_PORT": base + 4,
        "METRICS__REDUCER_PORT": base + 5,
        "METRICS__EXPERT_BASE_PORT": base + 6,  # experts 0..9: base + 6 .. base + 15
    }
    env.update({f"TRACI_{k}": str(v) for k, v in ports.items()})
    env["COLUMNS"] = "100"
    return env


# -- one shell per document -----------------------------------------------------------------


class Shell:
    """One bash, fed one command at a time; each command's exit code and output come back.
    The shell reads the commands on its stdin; each runs with stdin from /dev/null, as
    ``eval`` in the shell itself, so background jobs stay in its job table for later lines
    (``kill %1``). The exit code comes back on a pipe of its own, which no command holds: a
    background job printing at the same time cannot garble it."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.codes_r, codes_w = os.pipe()
        loop = (
            'while IFS= read -r -d "" __cmd; do '
            f'eval "$__cmd" </dev/null {codes_w}>&-; printf "%s\\n" "$?" >&{codes_w}; done'
        )
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-c", loop],
            cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(codes_w,),
        )  # fmt: skip
        os.close(codes_w)
        self.codes = b""

    def run(self, command: str, timeout: float) -> tuple[int | None, str]:
        """(exit code, output); the code is None when it ran past ``timeout`` or the
        shell ended."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n\0")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        out, fd = b"", self.proc.stdout.fileno()
        code: int | None = None
        while code is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, out.decode(errors="replace")
            ready, _, _ = select.select([fd, self.codes_r], [], [], min(left, 1.0))
            if fd in ready:
                out += os.read(fd, 65536)
            if self.codes_r in ready:
                chunk = os.read(self.codes_r, 64)
                if not chunk:  # the shell ended (an `exit`?)
                    return None, out.decode(errors="replace")
                self.codes += chunk
                if b"\n" in self.codes:
                    line, self.codes = self.codes.split(b"\n", 1)
                    code = int(line)
        drain = time.monotonic() + 2  # what it printed last, still in the pipe
        while time.monotonic() < drain and select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
        return code, out.decode(errors="replace")

    def close(self) -> None:
        """End the shell and everything it started (its own session)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        # children that outlived the shell (its session): none may stay behind
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        os.close(self.codes_r)


# -- what each command is said to produce ---------------------------------------------------


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;``, ``&``, ``|``)."""
    lexer = shlex.shlex(strip_comment(text), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "&", "|", ";;"):
            out.append([])
        else:
            out[-1].append(token)
    return [argv for argv in out if argv]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def run_dir_of(checkout: Path, config: str) -> Path:
    cfg = yaml.safe_load((checkout / config).read_text())
    return checkout / cfg.get("run_dir", "runs/{run_id}").format(run_id=cfg.get("run_id"))


def fresh(path: Path, since: float) -> bool:
    return path.exists() and path.stat().st_mtime >= since - 1


def check(argv: list[str], out: str, checkout: Path, since: float) -> list[str]:
    """What the docs say this command produces that is not there (empty: all of it is)."""
    problems: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    name = Path(argv[0]).name
    if argv[:2] == ["make", "run"]:
        argv = ["traci", "up", "examples/digits.yaml"]  # the Makefile's CONFIG
        name = "traci"
    sub = argv[1] if len(argv) > 1 else ""
    if name == "traci" and sub == "up":
        config = next((a for a in argv[2:] if a.endswith((".yaml", ".yml"))), None)
        run = run_dir_of(checkout, config) if config else checkout / "runs" / "traci"  # built-in
        need(fresh(run / "summary.json", since), f"{run}/summary.json written by this run")
        need("done: " in out, "its closing 'done: ...' line")
        need(fresh(run / "plots" / "loss.png", since), f"{run}/plots/loss.png drawn")
    elif name == "traci" and sub == "predict":
        dest = option(argv, "--output")
        body = (checkout / dest).read_text() if dest and (checkout / dest).exists() else out
        need(not dest or fresh(checkout / dest, since), f"{dest} written")
        head = next((line for line in body.splitlines() if line.startswith("row,")), "")
        need("prediction" in head.split(","), "a CSV with a prediction column")
        if "--attention" in argv:
            need(any(c.startswith("attn_") for c in head.split(",")), "attn_<expert> columns")
        if option(argv, "--split") == "test":
            need("test accuracy" in out, "the 'test accuracy ...' line")
    elif name == "traci" and sub == "export":
        fmt = option(argv, "--format")
        default = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}[fmt or "onnx"]
        dest = option(argv, "--output") or str(Path(option(argv, "--run") or ".") / default)
        need(fresh(checkout / dest, since), f"{dest} written")
    elif name == "traci" and sub == "request":
        dest = option(argv, "--output")
        body = (checkout / dest).read_text() if dest else out
        # a background `traci serve` of an earlier line may print into this output too
        # (its "ready: ..." line, stop 25's CI), so the header is found, not taken as line 1
        head = next((line for line in body.splitlines() if line.startswith("row,")), "")
        need("prediction" in head.split(","), "a CSV answer with a prediction column")
        need("rows served by experts" in out, "the 'rows served by experts ...' line")
    elif name == "traci" and sub == "health":
        need("ready to answer" in out, "'broker ready to answer'")
    elif name == "python" and argv[1:3] == ["-m", "traci_ml.app.partysplit"]:
        need(fresh(checkout / argv[3] / "parties.yaml", since), f"{argv[3]}/parties.yaml written")
    elif name in ("head", "cat"):
        dest = option(argv, ">")
        if dest:
            need(fresh(checkout / dest, since) and (checkout / dest).stat().st_size > 0,
                 f"{dest} written")  # fmt: skip
        else:
            need(bool(out.strip()), "some output")
    return problems


def readme_run_files() -> set[str]:
    """The names README's "What a run writes" table gives (each backticked name in the
    first column; ``<i>``-style parts as wildcards)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## What a run writes", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`([^`]+)`", row.split("|")[1]))
    return names


def unlisted(run: Path, listed: set[str]) -> list[str]:
    """Entries of the run directory (top level) that README's table does not name."""
    tops = {n.rstrip("/").split("/")[0] for n in listed}
    return sorted(p.name for p in run.iterdir() if p.name not in tops)


# -- the test ---------------------------------------------------------------------------------


def test_every_doc_command_is_known_to_the_parser():
    """The parser finds the commands the test is about (a broken parser would run none)."""
    readme = [c.key for c in document_commands("README.md")]
    tutorial = [c.key for c in document_commands("docs/tutorial.md")]
    assert "make install && make run" in readme
    assert any(k.startswith("traci up examples/heterogeneous.yaml") for k in tutorial)
    stale = set(EXCLUDED) - set(readme) - set(tutorial)
    assert not stale, f"EXCLUDED names commands no document holds any more: {sorted(stale)}"


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_command_of_the_document_runs_as_written(doc, tmp_path):
    commands = document_commands(doc)
    assert commands, f"{doc}: no shell commands found"
    checkout = user_checkout(tmp_path / "repo")
    shell = Shell(checkout, user_environment(checkout))
    ran: list[str] = []
    try:
        for cmd in commands:
            if cmd.key in EXCLUDED:
                ran.append(f"  not run  {cmd.where()}: {EXCLUDED[cmd.key]}")
                continue
            since = time.time()
            t0 = time.monotonic()
            code, out = shell.run(cmd.text, COMMAND_TIMEOUT)
            took = time.monotonic() - t0
            ran.append(f"{took:6.1f}s  {cmd.where()}")
            want = EXIT_CODES.get(cmd.key, 0)
            tail = out[-4000:]
            assert code is not None, (
                f"{cmd.where()} did not finish in {COMMAND_TIMEOUT}s; output:\n{tail}"
            )
            assert code == want, f"{cmd.where()} exited {code} (want {want}); output:\n{tail}"
            for argv in simple_commands(cmd.text):
                problems = check(argv, out, checkout, since)
                assert not problems, (
                    f"{cmd.where()} exited {code} but produced not what the docs say: "
                    f"{'; '.join(problems)}; output:\n{tail}"
                )
        # the background jobs the document started, it also ended
        code, out = shell.run("wait", JOBS_TIMEOUT)
        assert code is not None, (
            f"{doc}: a background job it started was still running {JOBS_TIMEOUT}s after its "
            f"last command; output:\n{out[-3000:]}"
        )
        if doc == "README.md":  # every file of the run is in README's table
            run = checkout / "runs" / "digits"
            extra = unlisted(run, readme_run_files())
            assert not extra, (
                f"README.md 'What a run writes' does not name {extra}, which the README's "
                f"commands wrote in {run}"
            )
    finally:
        shell.close()
        print(f"{doc}: its commands, in order (seconds each):\n" + "\n".join(ran))
