"""Throughput of a batch: serial (one process, one torch thread) against Ray (2 one-thread workers).

Both sides are the real command line, timed from process start to exit, on the same prompts
file and settings:
- serial: `OMP_NUM_THREADS=1 python generate.py --prompts FILE --out OUT/serial ...`
- ray:    `python generate.py --prompts FILE --out OUT/ray --ray --ray-cpus-per-run 1 ...`
  (starts a local Ray cluster with this machine's CPUs: 2 worker slots on 2 cores).
The primitives prior's library is built once beforehand (not timed), so neither side renders it.

Besides runs per hour and their ratio, it splits what Ray adds, from batch.json, so that the
scaling to N GPUs can be projected: the cluster's start (process wall minus the batch's own
wall), the workers' start (process spawn and imports), each run's scheduling (hand-out to result
minus the run's own seconds on its worker) and each worker's guidance model load.

    python -m bench.batch                          # 6 runs at the bench settings below
    python -m bench.batch --runs 4 --set coarse.iters=30
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow torus", "a purple cylinder", "an orange capsule"]
# About 20 s a run on one thread of an idle core: the quality smoke run's sizes (bench/RESULTS.md).
SETTINGS = [
    "prior.resolution=32", "prior.renders_per_view=24", "coarse.iters=60", "coarse.resolution=32",
    "coarse.preview_every=0", "refine.iters=10", "refine.resolution=32", "refine.preview_every=0",
    "export.texture_size=128", "export.turntable=false",
]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "generate.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="prompts in the batch (cycling over 6 shapes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting on top of the bench's own (repeatable)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "batch", help="run folders go here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "batch.json")
    args = parser.parse_args(argv)

    # 1. A fresh work folder, a prompts file, the prior's library built once.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.work / stamp
    work.mkdir(parents=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.runs)]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = ["--guidance", "primitives", "--preset", "quick", "--device", "cpu"]
    for item in SETTINGS + args.overrides:
        common += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    one_thread = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    warm = timed([prompts[0], "--out", str(work / "warm-up"), *common, "--set", "coarse.iters=1",
                  "--set", "refine.iters=1"], one_thread)
    report = {"runs": args.runs, "settings": SETTINGS + args.overrides, "cpus": os.cpu_count(),
              "warm_up_seconds": warm, "load_average_before": load_average()}

    # 2. Serial, then Ray, each a whole command line.
    serial = timed(["--prompts", str(work / "prompts.txt"), "--out", str(work / "serial"), *common], one_thread)
    report["load_average_between"] = load_average()
    ray = timed(["--prompts", str(work / "prompts.txt"), "--out", str(work / "ray"), "--ray", "--ray-cpus-per-run", "1",
                 *common], env)
    report["load_average_after"] = load_average()

    # 3. What each side spent, from run.json and batch.json.
    from stages.runs import RUN_FILE, RunRecord

    serial_runs = [RunRecord.load(p.parent).total_seconds for p in sorted((work / "serial").glob(f"*/{RUN_FILE}"))]
    batch = json.loads((work / "ray" / "batch.json").read_text())
    runs = batch["runs"]
    loads = [r["load_seconds"] for r in runs if r["model_loaded"]]
    report.update(
        serial_seconds=serial, ray_seconds=ray,
        serial_runs_per_hour=3600 * args.runs / serial, ray_runs_per_hour=3600 * args.runs / ray,
        ratio=serial / ray,
        serial_run_seconds_mean=statistics.mean(serial_runs),
        ray_run_seconds_mean=statistics.mean(r["seconds"] for r in runs),
        ray_cluster_start_seconds=ray - batch["wall_seconds"],
        ray_batch_seconds=batch["wall_seconds"],
        ray_worker_start_seconds=batch["ray"]["worker_start_seconds"],
        ray_workers=len(batch["ray"]["workers"]),
        ray_scheduling_seconds_per_run=statistics.mean(r["wall_seconds"] - r["seconds"] for r in runs),
        ray_model_load_seconds_per_worker=statistics.mean(loads) if loads else 0.0,
        ray_runs_per_worker={str(pid): sum(r["pid"] == pid for r in runs) for pid in {r["pid"] for r in runs}},
        work=str(work),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {args.out}")
    return 0


def print_table(r: dict) -> None:
    rows = [
        ("runs", f"{r['runs']}", ""),
        ("wall, whole command (s)", f"{r['serial_seconds']:.1f}", f"{r['ray_seconds']:.1f}"),
        ("runs per hour", f"{r['serial_runs_per_hour']:.0f}", f"{r['ray_runs_per_hour']:.0f}"),
        ("ratio ray / serial", "", f"{r['ratio']:.2f}x"),
        ("mean seconds of one run", f"{r['serial_run_seconds_mean']:.1f}", f"{r['ray_run_seconds_mean']:.1f}"),
        ("cluster start + driver (s)", "", f"{r['ray_cluster_start_seconds']:.1f}"),
        ("workers' start (s, all in parallel)", "", f"{r['ray_worker_start_seconds']:.1f}"),
        ("scheduling per run (s)", "", f"{r['ray_scheduling_seconds_per_run']:.3f}"),
        ("model load per worker (s)", "", f"{r['ray_model_load_seconds_per_worker']:.2f}"),
        ("load average before / between / after", "",
         f"{r['load_average_before'][0]} / {r['load_average_between'][0]} / {r['load_average_after'][0]}"),
    ]
    print(f"{'':<40}{'serial':>12}{'ray x' + str(r['ray_workers']):>14}")
    for name, a, b in rows:
        print(f"{name:<40}{a:>12}{b:>14}")


if __name__ == "__main__":
    sys.exit(main())
