"""Data where it lives (issue 10): id alignment, one party's load, and training on party files.

1. ``align``: one expert against the label holder, in-process (no sockets): the expert holds
   N int ids, 70% of them among the label holder's N, 30% unlabelled. Timed: the whole
   exchange (``Aligner.request``, encode, a copy of every frame as a socket would make,
   decode, ``LabelHolder.answer``, the same back, ``Aligner.rows``), split into the expert's
   side, the label holder's side and the wire; bytes on the wire. plain and psi. The answer
   is checked (held rows == the true overlap, each at its right global row): a wrong
   alignment raises. The label holder's side of psi includes hashing and blinding its own
   ids, which a run does once for all its experts.
2. ``load``: a ``traci_ml.app.partygen`` Parquet dataset (cached under /tmp, keyed by its
   parameters); per expert, sequentially, a fresh process times ``load_expert_data``, the
   alignment (plain, against a ``LabelHolder`` in this process, the frames over a pipe) and
   ``ExpertData.align`` (standardisation), and reports its peak RSS above its RSS after the
   imports, against the budget 2 x its own table as float32 (rows x columns x 4 bytes).
3. ``train``: a real ``traci up`` on those files (``data.source: parties``, plain), samples/s
   as e2e takes them (the reducer's records between ``warmup`` steps and the last step),
   the summary's figure (which includes the final evaluation: ``test_fraction`` 0.01 keeps
   it small), start-up time and each service's peak RSS; for reference the one-table
   ``synthetic`` source with the same model shapes (16 features per expert, 20k rows)
   alternating with it. Not a like-for-like baseline: it only says what the same model
   does when every process holds the whole (small) table.

    python -m bench.data [--quick]          # this section alone (bench.run --only data)
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "traci-bench-cache"
ID_BASE = 1_000_000_000
OVERLAP = 0.7  # share of an expert's ids that are labelled (align) / of the ids a party holds
BUDGET = 2.0  # peak RSS above the imports, in units of the party's own float32 table
RUN_ID = "bench-data"
MIB = 1 << 20


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


# ---- 1. alignment, in-process ------------------------------------------------------------


def id_sets(n: int, overlap: float = OVERLAP, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(label holder's ids, expert's ids, true overlap): N distinct int ids each, of which
    ``round(overlap * n)`` are shared; both in random order."""
    rng = np.random.default_rng([seed, n])
    shared = round(overlap * n)
    universe = ID_BASE + rng.permutation(2 * n - shared)
    labels = universe[:n]
    expert = np.concatenate([labels[rng.choice(n, shared, replace=False)], universe[n:]])
    rng.shuffle(expert)
    return labels, expert, shared


def _wire(frames: list[Any]) -> tuple[list[bytes], int]:
    """Each frame copied into bytes, as a socket delivers it, and the bytes in all."""
    out = [bytes(memoryview(f).cast("B")) for f in frames]
    return out, sum(len(b) for b in out)


def exchange(labels: np.ndarray, expert: np.ndarray, mode: str, *, seed: int = 0,
             test_fraction: float = 0.2) -> dict[str, Any]:  # fmt: skip
    """One alignment of ``expert``'s ids against ``labels``: times, bytes and the row map."""
    from traci_ml import proto
    from traci_ml.core.align import global_rows
    from traci_ml.services.expert.aligning import Aligner
    from traci_ml.services.reducer.aligning import LabelHolder

    t = time.perf_counter()
    rows = global_rows(labels, seed, test_fraction)  # the reducer's start-up, not the exchange
    setup = time.perf_counter() - t
    holder = LabelHolder(rows.ids, "int", rows.n_train, rows.n_test, mode=mode, run_id=RUN_ID,
                         where="bench labels (id column 'id')")  # fmt: skip
    aligner = Aligner(0, expert, "int", mode, RUN_ID)
    t0 = time.perf_counter()
    request = aligner.request()
    t1 = time.perf_counter()
    frames, request_bytes = _wire(proto.encode(request))
    received = proto.decode(frames)
    t2 = time.perf_counter()
    answer = holder.answer(received)
    t3 = time.perf_counter()
    frames, answer_bytes = _wire(proto.encode(answer))
    answered = proto.decode(frames)
    t4 = time.perf_counter()
    if answered.stage != "answer":
        raise RuntimeError(f"data bench: {mode} alignment refused: {answered.detail}")
    row_map = aligner.rows(answered)
    t5 = time.perf_counter()
    return {
        "total_s": t5 - t0, "expert_s": (t1 - t0) + (t5 - t4), "holder_s": t3 - t2,
        "wire_s": (t2 - t1) + (t4 - t3), "holder_setup_s": setup,
        "request_bytes": request_bytes, "answer_bytes": answer_bytes,
        "rows": rows, "row_map": row_map,
    }  # fmt: skip


def check_alignment(rows: Any, row_map: Any, expert: np.ndarray, shared: int, mode: str) -> None:
    """Raise unless the row map holds exactly the shared ids, each at its global row."""
    held = row_map.held()
    if sum(held) != shared:
        raise RuntimeError(f"data bench: {mode} alignment of {len(expert)} ids holds {held} "
                           f"rows, the true overlap is {shared}")  # fmt: skip
    for table, ids in ((row_map.train, rows.train_ids), (row_map.test, rows.test_ids)):
        present = table >= 0
        if not np.array_equal(expert[table[present]], ids[present]):
            raise RuntimeError(f"data bench: {mode} alignment maps rows to the wrong ids")


def align(sizes: tuple[int, ...], *, repeats: int = 3, modes: tuple[str, ...] = ("plain", "psi"),
          once_from: int = 1_000_000) -> dict[str, Any]:  # fmt: skip
    """Every (mode, size): ``repeats`` exchanges (psi: one at the largest size, or from
    ``once_from`` ids), medians with min and max."""
    cells = []
    for n in sizes:
        labels, expert, shared = id_sets(n)
        for mode in modes:
            reps = 1 if mode == "psi" and (n >= once_from or n == max(sizes)) else repeats
            runs = []
            for _ in range(reps):
                r = exchange(labels, expert, mode)
                check_alignment(r["rows"], r["row_map"], expert, shared, mode)
                runs.append(r)
                gc.collect()
            cell = {
                "mode": mode, "ids": n, "labelled": shared, "repeats": reps,
                **{k: spread([r[k] for r in runs]) for k in
                   ("total_s", "expert_s", "holder_s", "wire_s", "holder_setup_s")},
                "request_bytes": runs[0]["request_bytes"], "answer_bytes": runs[0]["answer_bytes"],
                "held": list(runs[0]["row_map"].held()), "correct": True,
            }  # fmt: skip
            cells.append(cell)
            print("  " + fmt_align(cell), flush=True)
            del runs
    return {"overlap": OVERLAP, "id_type": "int", "test_fraction": 0.2, "threads": os.cpu_count(),
            "cells": cells}  # fmt: skip


def fmt_align(c: dict[str, Any]) -> str:
    t = c["total_s"]
    return (
        f"align {c['mode']:<5} {c['ids']:>9,} ids: {t['median']:8.3f} s [{t['min']:.3f}-"
        f"{t['max']:.3f}] x{c['repeats']} (expert {c['expert_s']['median']:.3f} s, label holder "
        f"{c['holder_s']['median']:.3f} s, wire {c['wire_s']['median']:.3f} s), "
        f"{c['request_bytes'] / MIB:.1f} + {c['answer_bytes'] / MIB:.1f} MiB on the wire, "
        f"held {sum(c['held']):,} = overlap"
    )


# ---- 2. one party's load, in a fresh process ---------------------------------------------


def dataset(rows: int, *, parties: int = 4, features: int = 64, overlap: float = OVERLAP,
            classes: int = 10, seed: int = 0, cache: Path = CACHE) -> dict[str, Any]:  # fmt: skip
    """A partygen Parquet dataset, generated once per parameters into ``cache``."""
    from traci_ml.app.partygen import generate

    key = f"partygen-r{rows}-p{parties}-f{features}-o{overlap}-c{classes}-s{seed}-parquet"
    where = cache / key
    if not (where / "info.json").exists():
        tmp = cache / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.perf_counter()
        info = generate(tmp, rows=rows, parties=parties, features=features, overlap=overlap,
                        classes=classes, fmt="parquet", seed=seed)  # fmt: skip
        info["generate_s"] = round(time.perf_counter() - t, 2)
        for f in [info["labels"], *info["parties"]]:
            f["path"] = Path(f["path"]).name  # relative: the directory is renamed
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(where, ignore_errors=True)
        tmp.rename(where)
        cached = False
    else:
        cached = True
    info = json.loads((where / "info.json").read_text())
    for f in [info["labels"], *info["parties"]]:
        f["path"] = str(where / f["path"])
    info.update(dir=str(where), cached=cached)
    return info


def parties_data(info: dict[str, Any], *, align: str = "plain",
                 test_fraction: float = 0.01) -> dict[str, Any]:  # fmt: skip
    """The ``data`` section of a config over ``info``'s files."""
    return {
        "source": "parties",
        "labels": {"path": info["labels"]["path"], "label": info["label_column"]},
        "id": info["id_column"],
        "align": align,
        "test_fraction": test_fraction,
        "views": [{"name": f"party-{k}", "columns": p["columns"], "path": p["path"]}
                  for k, p in enumerate(info["parties"])],
    }  # fmt: skip


def _send(fh: BinaryIO, frames: list[Any]) -> None:
    fh.write(struct.pack("<I", len(frames)))
    for f in frames:
        view = memoryview(f).cast("B")
        fh.write(struct.pack("<Q", view.nbytes))
        fh.write(view)
    fh.flush()


def _recv(fh: BinaryIO) -> list[bytes]:
    def exactly(n: int) -> bytes:
        buf = fh.read(n)
        if len(buf) != n:
            raise EOFError("the other process closed the pipe")
        return buf

    (count,) = struct.unpack("<I", exactly(4))
    return [exactly(struct.unpack("<Q", exactly(8))[0]) for _ in range(count)]


def _status() -> dict[str, int]:
    """This process's VmRSS and VmHWM, KiB."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]), "hwm": int(fields["VmHWM"].split()[0])}


def load_worker(config_path: str, expert_id: int) -> None:
    """The child: baseline after imports, then load, align (over stdin/stdout) and
    standardise, with RSS and the high-water mark after each step; the result as JSON."""
    out = os.fdopen(os.dup(1), "wb")  # the frames; anything printed goes to stderr
    os.dup2(2, 1)
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # as traci up sets it
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401  (read_party's reader, imported before the baseline)

    from traci_ml import proto
    from traci_ml.core.config import validate
    from traci_ml.core.data import fit_positions, load_expert_data
    from traci_ml.core.data.parties import read_party  # noqa: F401  (load_expert_data's lazy import)
    from traci_ml.services.expert.aligning import Aligner

    config = validate(json.loads(Path(config_path).read_text()))
    gc.collect()
    try:  # reset the high-water mark: the imports' transient peak is not the data's
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    base = _status()
    steps: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    pool = pa.default_memory_pool()

    def mark(step: str, t0: float) -> None:
        seconds[step] = time.perf_counter() - t0
        s = _status()
        steps[step] = {"rss_mib": s["rss"] / 1024, "hwm_mib": s["hwm"] / 1024,
                       "arrow_pool_mib": pool.bytes_allocated() / MIB}  # fmt: skip

    t = time.perf_counter()
    data = load_expert_data(config, expert_id)
    mark("load", t)
    arrow_peak = pool.max_memory() / MIB
    t = time.perf_counter()
    aligner = Aligner(expert_id, data.ids, data.id_type, config.data.align, config.run_id)
    _send(out, proto.encode(aligner.request()))
    answer = proto.decode(_recv(sys.stdin.buffer))
    if answer.stage != "answer":
        raise RuntimeError(f"alignment refused: {answer.detail}")
    row_map = aligner.rows(answer)
    del answer
    mark("align", t)
    t = time.perf_counter()
    data.align(row_map, fit_positions(row_map.n_train, config))
    mark("standardise", t)
    result = {
        "rows": len(data.ids), "columns": len(data.columns), "held": list(row_map.held()),
        "baseline_rss_mib": base["rss"] / 1024, "hwm_reset": reset,
        "table_mib": data.table.nbytes / MIB, "ids_mib": data.ids.nbytes / MIB,
        "arrow_pool_peak_mib": arrow_peak, "seconds": seconds, "steps": steps,
    }  # fmt: skip
    _send(out, [json.dumps(result).encode()])
    out.close()


def load_one(config: dict[str, Any], expert_id: int, holder: Any, tmp: Path) -> dict[str, Any]:
    """Run one expert's load in a fresh process, answering its alignment here."""
    from traci_ml import proto

    config_path = tmp / "config.json"
    config_path.write_text(json.dumps(config))
    err_path = tmp / f"load-{expert_id}.err"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.data", "load-worker", str(config_path), str(expert_id)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        request = proto.decode(_recv(proc.stdout))
        t = time.perf_counter()
        frames = proto.encode(holder.answer(request))
        answer_s = time.perf_counter() - t
        _send(proc.stdin, frames)
        result = json.loads(_recv(proc.stdout)[0])
        proc.stdin.close()
        rc = proc.wait(timeout=120)
    except (EOFError, BrokenPipeError, OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
        log = err_path.read_text()[-3000:]
        raise RuntimeError(f"data bench: the load of expert {expert_id} failed "
                           f"({proc.returncode}):\n{log}") from None  # fmt: skip
    finally:
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:  # a broken pipe's unflushed bytes
                pass
    if rc != 0:
        raise RuntimeError(f"data bench: expert {expert_id}'s load exited {rc}:\n"
                           f"{err_path.read_text()[-3000:]}")  # fmt: skip
    if sum(result["held"]) != result["rows"]:  # partygen: every party id is labelled
        raise RuntimeError(f"data bench: expert {expert_id} holds {result['held']} labelled "
                           f"rows of its {result['rows']}, all of them are labelled")  # fmt: skip
    own = result["rows"] * result["columns"] * 4 / MIB
    peak = max(s["hwm_mib"] for s in result["steps"].values())
    base = result["baseline_rss_mib"]
    result.update(
        expert=expert_id, own_float32_mib=own, peak_rss_mib=peak,
        peak_minus_baseline_mib=peak - base,
        rss_ratio=(peak - base) / own, over_budget=(peak - base) / own >= BUDGET,
        holder_answer_s=answer_s, total_s=sum(result["seconds"].values()),
        # how far each step raised the high-water mark (the step that sets the peak)
        peak_added_mib={step: s["hwm_mib"] - prev for step, s, prev in _increments(result, base)},
    )  # fmt: skip
    return result


def _increments(result: dict[str, Any], base: float) -> list[tuple[str, dict[str, float], float]]:
    out, prev = [], base
    for step, s in result["steps"].items():
        out.append((step, s, prev))
        prev = s["hwm_mib"]
    return out


def load(info: dict[str, Any], *, experts: int | None = None) -> dict[str, Any]:
    """Each expert's load, sequentially, each in its own fresh process."""
    from traci_ml.core.config import validate
    from traci_ml.core.data import load_labels
    from traci_ml.services.reducer.aligning import LabelHolder

    config = {"run_id": RUN_ID, "seed": 0, "data": parties_data(info)}
    t = time.perf_counter()
    ds = load_labels(validate(config))  # the reducer's start-up
    labels_s = time.perf_counter() - t
    assert ds.ids_train is not None and ds.ids_test is not None
    ids = np.concatenate([ds.ids_train, ds.ids_test])
    holder = LabelHolder(ids, "int", len(ds.ids_train), len(ds.ids_test), mode="plain",
                         run_id=RUN_ID, where="labels")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="traci-bench-data-") as tmp:
        for k in range(experts or len(info["parties"])):
            r = load_one(config, k, holder, Path(tmp))
            rows.append(r)
            print("  " + fmt_load(r), flush=True)
    dataset_info = {k: info[k] for k in ("rows", "features", "overlap", "classes", "format",
                                         "dir", "cached")}  # fmt: skip
    dataset_info["parties"] = len(info["parties"])
    dataset_info["generate_s"] = info.get("generate_s")
    return {
        "dataset": dataset_info, "labels_load_s": labels_s, "budget_ratio": BUDGET,
        "experts": rows, "max_rss_ratio": max(r["rss_ratio"] for r in rows),
        "over_budget": [r["expert"] for r in rows if r["over_budget"]],
    }  # fmt: skip


def fmt_load(r: dict[str, Any]) -> str:
    s = r["seconds"]
    flag = "  OVER BUDGET" if r["over_budget"] else ""
    added = ", ".join(f"{k} +{v:.0f}" for k, v in r["peak_added_mib"].items())
    return (
        f"load expert {r['expert']}: {r['rows']:,} rows x {r['columns']}: load "
        f"{s['load']:.2f} s, align {s['align']:.2f} s, standardise {s['standardise']:.2f} s; "
        f"RSS base {r['baseline_rss_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB "
        f"(+{r['peak_minus_baseline_mib']:.0f}: {added}) vs own float32 "
        f"{r['own_float32_mib']:.0f} MiB: rss_ratio {r['rss_ratio']:.2f}{flag}"
    )


# ---- 3. training on the party files --------------------------------------------------------


def _cluster_run(cfg: dict[str, Any], *, batch: int, warmup: int) -> dict[str, Any]:
    from bench.cluster import run_cluster, train_rate

    peaks: dict[str, int] = {}

    def sample(pids: dict[str, int], run_dir: Path) -> None:
        for name, pid in pids.items():
            try:
                with open(f"/proc/{pid}/status") as fh:
                    fields = dict(line.split(":", 1) for line in fh if ":" in line)
                peaks[name] = max(peaks.get(name, 0), int(fields["VmHWM"].split()[0]))
            except (OSError, KeyError, ValueError):
                pass

    launched = time.time()
    records, summary = run_cluster(cfg, sample=sample, every=0.25)
    train = [r for r in records if r["kind"] == "train"]
    return {
        "samples_per_sec": train_rate(records, batch, warmup),
        "summary_samples_per_sec": summary["samples_per_sec"],
        "startup_s": train[0]["time"] - launched,
        "final_eval_s": summary["wall_seconds"] - train[-1]["wall_seconds"],
        "wall_s": time.time() - launched,
        "test_accuracy": summary.get("test_accuracy"),
        "peak_rss_mib": {name: kib / 1024 for name, kib in sorted(peaks.items())},
    }


def train(info: dict[str, Any], *, steps: int, batch: int, repeats: int,
          test_fraction: float = 0.01) -> dict[str, Any]:  # fmt: skip
    """``repeats`` runs of parties and of the synthetic reference, alternating."""
    from bench.reference import reference_config

    warmup = steps // 5
    per_expert = info["features"] // len(info["parties"])
    configs = {}
    for name in ("parties", "synthetic"):
        cfg = reference_config(batch_size=batch, steps=steps)
        cfg["run_id"] = RUN_ID
        if name == "parties":
            cfg["data"] = parties_data(info, test_fraction=test_fraction)
        else:
            cfg["data"] = {"source": "synthetic", "views": "even", "test_fraction": test_fraction,
                           "synthetic": {"rows": 20_000, "features": info["features"],
                                         "classes": info["classes"],
                                         "experts": len(info["parties"])}}  # fmt: skip
        configs[name] = cfg
    runs: dict[str, list[dict[str, Any]]] = {"parties": [], "synthetic": []}
    for _ in range(repeats):
        for name, cfg in configs.items():
            r = _cluster_run(cfg, batch=batch, warmup=warmup)
            runs[name].append(r)
            experts = [v for k, v in r["peak_rss_mib"].items() if k.startswith("expert")]
            print(f"  train {name:<9} batch {batch}: {r['samples_per_sec']:,.0f} samples/s "
                  f"(summary {r['summary_samples_per_sec']:,.0f}, start-up {r['startup_s']:.1f} s, "
                  f"final eval {r['final_eval_s']:.2f} s, expert peak RSS "
                  f"{max(experts, default=float('nan')):.0f} MiB)", flush=True)  # fmt: skip
    out: dict[str, Any] = {"steps": steps, "batch_size": batch, "warmup": warmup,
                           "test_fraction": test_fraction, "features_per_expert": per_expert,
                           "synthetic_rows": 20_000}  # fmt: skip
    for name, rs in runs.items():
        names = sorted({n for r in rs for n in r["peak_rss_mib"]})
        out[name] = {
            **{k: spread([r[k] for r in rs]) for k in
               ("samples_per_sec", "summary_samples_per_sec", "startup_s", "final_eval_s")},
            "test_accuracy": [r["test_accuracy"] for r in rs],
            "peak_rss_mib": {n: max(r["peak_rss_mib"].get(n, 0.0) for r in rs) for n in names},
        }  # fmt: skip
    out["parties_vs_synthetic"] = (out["parties"]["samples_per_sec"]["median"]
                                   / out["synthetic"]["samples_per_sec"]["median"])  # fmt: skip
    return out


# ---- the section ----------------------------------------------------------------------------


def run(*, quick: bool = False) -> dict[str, Any]:
    sizes = (10_000, 100_000) if quick else (100_000, 1_000_000)
    rows = 200_000 if quick else 2_000_000
    out: dict[str, Any] = {"loadavg_start": os.getloadavg()}  # a busy machine shows here
    out["align"] = align(sizes)
    info = dataset(rows)
    out["load"] = load(info)
    out["train"] = train(info, steps=150 if quick else 300, batch=256, repeats=1 if quick else 3)
    out["loadavg_end"] = os.getloadavg()
    return out


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The section's lines for bench.run's summary table."""
    lines = ["  " + fmt_align(c) for c in data.get("align", {}).get("cells", [])]
    ld = data.get("load")
    if ld:
        ds = ld["dataset"]
        lines.append(f"  load ({ds['rows']:,} rows, {ds['parties']} parties x "
                     f"{ds['features'] // ds['parties']} features, overlap {ds['overlap']}): "
                     f"max rss_ratio {ld['max_rss_ratio']:.2f} (budget < {ld['budget_ratio']:g})"
                     + (f", OVER BUDGET: experts {ld['over_budget']}" if ld["over_budget"]
                        else ""))  # fmt: skip
        lines += ["    " + fmt_load(r) for r in ld["experts"]]
    tr = data.get("train")
    if tr:
        p, s = tr["parties"], tr["synthetic"]
        experts = [v for k, v in p["peak_rss_mib"].items() if k.startswith("expert")]
        lines.append(
            f"  train parties batch {tr['batch_size']}: {p['samples_per_sec']['median']:,.0f} "
            f"samples/s [{p['samples_per_sec']['min']:,.0f}-{p['samples_per_sec']['max']:,.0f}] "
            f"(synthetic reference {s['samples_per_sec']['median']:,.0f}; ratio "
            f"{tr['parties_vs_synthetic']:.2f}), start-up {p['startup_s']['median']:.1f} s, "
            f"expert peak RSS {max(experts, default=float('nan')):.0f} MiB"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load-worker"]:
        load_worker(argv[1], int(argv[2]))
        return 0
    result = run(quick="--quick" in argv)
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
