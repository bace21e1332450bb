"""Speed benchmark: seconds per step of each stage, split into its parts, and peak memory.

For each stage, a few steps at a preset's resolutions:
- coarse (`stages.coarse.run`): render, guidance, backward, optimizer (its StepEvent.timings);
- refine (`stages.refine.run`): marching, rasterize, shade, guidance, regularize, backward (Adam included);
- export (`stages.export.export`): clean, unwrap, bake, write, turntable (ExportResult.timings, one run).
The guidance model is wrapped to add up the seconds spent inside it (predict_noise and, for
latent models, encode_images): the rest of a step is the overhead to drive down.
Peak memory: on the CPU the rise of the process RSS over its value before the stage (psutil,
sampled every 20 ms); on CUDA torch.cuda.max_memory_allocated over the allocation before it.
The stages run in a worker thread, as the pipeline runs them (see `in_worker_thread`).

Two set-ups, the same code:
- cpu: the offline primitives prior at the `--preset` (default quick);
- cuda: Stable Diffusion 2.1 base's architecture with random weights in fp16 (UNet, VAE and a
  CLIP text encoder of its size, built from their configs; nothing is downloaded) behind
  StableDiffusionGuidance's own methods, at `--cuda-preset` (default standard). Without a CUDA
  GPU this part prints "no CUDA GPU: CUDA figures not taken".
`--end-to-end` also runs the whole quick preset ("a red cube", primitives prior) and prints
run.json's seconds per stage.

    python -m bench.speed                                   # 5 steps per stage
    python -m bench.speed --steps 2 --devices cpu --set coarse.resolution=32
    python -m bench.speed --end-to-end --threads 1          # one torch thread (see bench/RESULTS.md)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.measure import PeakMemory, TimedGuidance
from bench.random_models import random_stable_diffusion
from guidance import registry
from stages.config import PRESETS, apply_overrides, preset

PROMPT = "a red cube"
NO_CUDA = "no CUDA GPU: CUDA figures not taken"
def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "cores": _cores(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": None}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# --------------------------------------------------------------------------- measuring
def in_worker_thread(fn, *args):
    """fn(*args) called in a new thread, as the pipeline runs its stages; returns its result or
    raises its exception. On the shared 2-core machine of bench/RESULTS.md, the same stage code
    ran 5-20x slower per step from the main thread with torch's default two (OpenMP) threads."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="bench-worker")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def summarize_steps(events: list, model_seconds: list[float], resolution: int, memory: PeakMemory,
                    vae_seconds: list[float] | None = None, vae_backward_seconds: list[float] | None = None) -> dict:
    """Mean seconds per part over the steps after the first (the first pays one-time costs); the VAE's
    backward is inside the "backward" part, and also given alone."""
    kept = events[1:] if len(events) > 1 else events
    model = model_seconds[1:] if len(events) > 1 else model_seconds
    vae = (vae_seconds[1:] if len(events) > 1 else vae_seconds) if vae_seconds else [0.0]
    vae_backward = (vae_backward_seconds[1:] if len(events) > 1 else vae_backward_seconds) if vae_backward_seconds else [0.0]
    parts = {k: sum(e.timings[k] for e in kept) / len(kept) for k in kept[0].timings}
    step = sum(parts.values())
    in_model = sum(model) / len(model)
    return {
        "resolution": resolution, "steps": len(events), "measured_steps": len(kept),
        "seconds_per_step": parts, "step_seconds": step, "first_step_seconds": sum(events[0].timings.values()),
        "model_seconds_per_step": in_model, "outside_model_share": 1.0 - in_model / step if step > 0 else 0.0,
        "vae_seconds_per_step": sum(vae) / len(vae), "vae_backward_seconds_per_step": sum(vae_backward) / len(vae_backward),
        **memory.as_dict(),
    }


def time_stages(guidance, config, device: torch.device, steps: int) -> dict:
    """Coarse, refine (from that coarse field) and export, `steps` SDS steps each."""
    from stages import coarse as coarse_stage
    from stages import export as export_stage
    from stages import refine as refine_stage

    timed = TimedGuidance(guidance, device)
    results = {}
    for name in ("coarse", "refine"):
        stage_config = copy.deepcopy(getattr(config, name))
        stage_config.iters, stage_config.preview_every = steps, 0
        if name == "coarse":
            # Time the steady state: shaded steps with normals (after the albedo warm-up), and the
            # occupancy grid skipping empty space from the first step (after its warm-up).
            stage_config.albedo_warmup = 0
            stage_config.volume.occupancy_warmup_steps = 0
        events, model_seconds, vae_seconds, vae_backward = [], [], [], []

        def record(event, events=events, model_seconds=model_seconds, vae_seconds=vae_seconds, vae_backward=vae_backward):
            model_seconds.append(timed.seconds - sum(model_seconds))
            vae_seconds.append(timed.vae_seconds - sum(vae_seconds))
            vae_backward.append(timed.vae_backward_seconds - sum(vae_backward))
            events.append(event)

        timed.seconds = timed.vae_seconds = timed.vae_backward_seconds = 0.0
        with PeakMemory(device) as memory:
            if name == "coarse":
                result = coarse_stage.run(timed, PROMPT, stage_config, config.camera, device, record)
                field = result.field
            else:
                result = refine_stage.run(field, timed, PROMPT, stage_config, config.camera, device, record)
        results[name] = summarize_steps(events, model_seconds, stage_config.resolution, memory, vae_seconds, vae_backward)
        results[name]["nonfinite_skipped"] = result.stats.get("nonfinite_skipped", 0)
        if name == "coarse" and "occupied_fraction" in result.stats:
            results[name]["occupied_fraction"] = result.stats["occupied_fraction"]
        if name == "refine":
            results[name]["faces"] = int(result.faces.shape[0])
    with PeakMemory(device) as memory, tempfile.TemporaryDirectory() as out_dir:
        def albedo(points):
            with torch.no_grad():
                return result.color_field.albedo(points)

        exported = export_stage.export(result.vertices, result.faces, albedo, out_dir, config.export)
    results["export"] = {
        "seconds": dict(exported.timings), "total_seconds": sum(exported.timings.values()),
        "faces": exported.num_faces, "texture_size": config.export.texture_size, **memory.as_dict(),
    }
    return results


# --------------------------------------------------------------------------- the two set-ups
def cpu_setup(preset_name: str, overrides: list[str]):
    from stages.workers import kept_guidance

    config = preset(preset_name)
    config.guidance, config.device = "primitives", "cpu"
    registry.get("primitives").adapt(config, None)  # white background and the prior's ambient, as in a run
    apply_overrides(config, overrides)
    return config, kept_guidance(registry.get("primitives"), config, torch.device("cpu"))


def cuda_setup(preset_name: str, overrides: list[str]):
    config = preset(preset_name)
    config.guidance, config.device = "stable-diffusion", "cuda"
    registry.get("stable-diffusion").adapt(config, None)
    apply_overrides(config, overrides)
    return config, random_stable_diffusion(torch.device("cuda"), torch.float16)


def end_to_end(overrides: list[str]) -> dict:
    from stages.pipeline import run_to_completion
    from stages.runs import RunRecord

    config = preset("quick")
    config.guidance = "primitives"
    apply_overrides(config, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        run_to_completion(PROMPT, config, run_dir=run_dir)
        total = time.perf_counter() - start
        record = RunRecord.load(run_dir)
    return {"prompt": PROMPT, "preset": "quick", "device": record.device, "stage_seconds": record.stage_seconds,
            "total_seconds": total, "stage_stats": record.stage_stats}


# --------------------------------------------------------------------------- output
def format_stages(title: str, results: dict) -> str:
    lines = [title, f"{'stage':<8}{'part':<16}{'s/step':>10}{'share':>8}"]
    for stage in ("coarse", "refine"):
        r = results[stage]
        step = r["step_seconds"]
        for part, seconds in r["seconds_per_step"].items():
            lines.append(f"{stage:<8}{part:<16}{seconds:>10.4f}{seconds / step:>8.1%}")
        occupied = f"; occupied {r['occupied_fraction']:.0%} of the grid" if "occupied_fraction" in r else ""
        lines.append(f"{stage:<8}{'= step':<16}{step:>10.4f}{1:>8.0%}   ({r['resolution']} px, mean of "
                     f"{r['measured_steps']} steps; first step {r['first_step_seconds']:.3f} s{occupied})")
        lines.append(f"{stage:<8}{'in the model':<16}{r['model_seconds_per_step']:>10.4f}{1 - r['outside_model_share']:>8.1%}")
        lines.append(f"{stage:<8}{'outside model':<16}{step - r['model_seconds_per_step']:>10.4f}{r['outside_model_share']:>8.1%}")
        if r["vae_backward_seconds_per_step"] > 0:
            lines.append(f"{stage:<8}{'  of it VAE bwd':<16}{r['vae_backward_seconds_per_step']:>10.4f}"
                         f"{r['vae_backward_seconds_per_step'] / step:>8.1%}   (inside backward)")
        lines.append(f"{stage:<8}{'peak memory':<16}{r['peak_memory_mb']:>+9.0f}M   ({_absolute(r)})")
    e = results["export"]
    lines.append(f"{'stage':<8}{'part':<16}{'seconds':>10}")
    for part, seconds in e["seconds"].items():
        lines.append(f"{'export':<8}{part:<16}{seconds:>10.3f}")
    lines.append(f"{'export':<8}{'= total':<16}{e['total_seconds']:>10.3f}   ({e['faces']} faces, "
                 f"{e['texture_size']} px texture)")
    lines.append(f"{'export':<8}{'peak memory':<16}{e['peak_memory_mb']:>+9.0f}M   ({_absolute(e)})")
    return "\n".join(lines)


def _absolute(r: dict) -> str:
    """The absolute peaks of a stage's report, in words."""
    text = f"{r['peak_absolute_mb'] / 1024:.2f} GB in all"
    if r.get("peak_reserved_mb") is not None:
        text += f", {r['peak_reserved_mb'] / 1024:.2f} GB reserved"
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="SDS steps per stage (the first is not averaged)")
    parser.add_argument("--preset", default="quick", choices=PRESETS, help="resolutions of the CPU runs")
    parser.add_argument("--cuda-preset", default="standard", choices=PRESETS, help="resolutions of the CUDA runs")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every run, e.g. coarse.resolution=32 (repeatable)")
    parser.add_argument("--end-to-end", action="store_true", help="also time a whole quick-preset run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/speed.json"))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    check_threads(parser, args.threads)
    return args


def write_json(path: Path, data) -> None:
    """Write a bench report as indented JSON (folders made as needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {path}")


def check_threads(parser: argparse.ArgumentParser, threads: int) -> None:
    """--threads of the bench scripts: 0 (torch's default) or more."""
    if threads < 0:
        parser.error(f"--threads must be >= 0, got {threads}")


def use_threads(threads: int) -> None:
    """Set torch's CPU threads when --threads asks for a number (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_threads(args.threads)
    torch.manual_seed(0)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), "steps": args.steps,
              "overrides": args.overrides}
    if "cpu" in args.devices:
        start = time.perf_counter()
        config, guidance = cpu_setup(args.preset, args.overrides)
        setup = time.perf_counter() - start
        results = in_worker_thread(time_stages, guidance, config, torch.device("cpu"), args.steps)
        report["cpu"] = {"preset": args.preset, "guidance": f"primitives ({guidance.resolution} px)",
                         "setup_seconds": setup, **results}
        print(format_stages(f"CPU, primitives prior at {guidance.resolution} px, preset {args.preset} "
                            f"(guidance setup {setup:.1f} s)", results))
    if "cuda" in args.devices:
        if not torch.cuda.is_available():
            print(NO_CUDA)
            report["cuda"] = {"skipped": NO_CUDA}
        else:
            start = time.perf_counter()
            config, guidance = cuda_setup(args.cuda_preset, args.overrides)
            setup = time.perf_counter() - start
            results = in_worker_thread(time_stages, guidance, config, torch.device("cuda"), args.steps)
            report["cuda"] = {"preset": args.cuda_preset, "guidance": "SD 2.1 base architecture, random weights, fp16",
                              "device": torch.cuda.get_device_name(0), "setup_seconds": setup, **results}
            print(format_stages(f"CUDA ({torch.cuda.get_device_name(0)}), random-weight SD 2.1 base fp16, "
                                f"preset {args.cuda_preset} (model build {setup:.1f} s; coarse parts are not "
                                f"synchronized by the stage, the model time and the step total are)", results))
    if args.end_to_end:
        report["end_to_end"] = end_to_end(args.overrides)
        e = report["end_to_end"]
        print(f"end to end, quick preset, {e['prompt']!r} on {e['device']}: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in e["stage_seconds"].items()) + f"; total {e['total_seconds']:.1f} s")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
