"""The GPU check kit: one command that tells whether the real-model path works on this CUDA machine,
how fast it is and how much memory it needs, without a network or a download.

    python -m bench.gpu_check                      # SD 2.1 base and IF-I-XL architectures, `standard`, 3 steps/stage
    python -m bench.gpu_check --steps 5 --models sd
    python -m bench.gpu_check --preset fast        # the ZeroGPU default preset, projected against stages.gpu_cost
    python -m bench.gpu_check --model-dtype bf16   # the precision a run sets with model_dtype=bf16
    python -m bench.gpu_check --tiny               # the dry run: tiny models on the CPU (the test suite runs it)
    python -m bench.gpu_check --zerogpu            # no GPU: each preset's GPU calls on a ZeroGPU Space (bench/zerogpu_plan.py)

For each guidance model it builds the real architecture with random weights in fp16 (`--model-dtype`;
IF's T5 keeps its fp32 `wo` layers as the real loader does) (bench/random_models.py), then:
1. embeds a prompt (IF: T5 on the GPU, the UNet parked) and times it;
2. runs a few steps of each stage at the preset's sizes through the stages' own code
   (bench.speed.time_stages): seconds per step split into render / model (UNet) / VAE / backward /
   optimizer for coarse and marching / rasterize / shade / model / VAE / regularize / backward for
   refine, the VAE's forward and its backward (inside "backward") apart, the share of step time inside
   the diffusion model, the absolute peak GPU memory per stage (allocated and the allocator's reserve,
   reset per stage), and the rasterizer backend used (nvdiffrast when importable, else the PyTorch one);
3. checks fp16 overflow: noise predictions over the whole timestep range are finite, and no step was
   skipped as non-finite;
4. projects the wall time of a full run of the preset: build + steps x seconds per step + export, and
   its GPU seconds of steps beside stages.gpu_cost's estimate (the figures that calibrate that model).
Each part checks the time budget (`--budget-s`, 8 minutes by default) before it starts, and a part
that would not fit is skipped and reported as such. Writes JSON (`--out`) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bench.random_models import (
    IF_I_XL_UNET,
    SD21_BASE_UNET,
    SD21_TEXT,
    SD_VAE,
    T5_XXL,
    random_deepfloyd_if,
    random_stable_diffusion,
)
from bench.speed import in_worker_thread, machine_info, time_stages, write_json
from guidance import registry
from guidance.hub import MODEL_DTYPES, default_dtype, model_dtype
from stages.config import PRESETS, apply_overrides, preset
from stages.run_facts import device_facts, guidance_facts, resolved_raster_backend

PROMPT = "a ceramic teapot"
MODELS = {"sd": "stable-diffusion", "if": "deepfloyd-if"}
TINY_SD = dict(
    unet=dict(SD21_BASE_UNET, sample_size=8, block_out_channels=(32, 64), attention_head_dim=(2, 4),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32),
    vae=dict(SD_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1),
    text=dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
)
TINY_IF = dict(
    unet=dict(IF_I_XL_UNET, sample_size=16, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
              down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
              up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=64,
              encoder_hid_dim=32, addition_embed_type_num_heads=4, norm_num_groups=8),
    text=dict(T5_XXL, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
)
TINY_SETTINGS = [  # the dry run's stage sizes (a few seconds a stage on a CPU)
    "coarse.resolution=16", "coarse.volume.num_samples=16", "coarse.field.num_levels=4",
    "coarse.field.log2_table_size=12", "coarse.field.max_resolution=32", "refine.resolution=32",
    "refine.batch_size=1", "refine.grid_resolution=16", "export.texture_size=64", "export.target_faces=2000",
    "export.turntable=false",
]


def build(key: str, device: torch.device, dtype: torch.dtype, tiny: bool):
    """The random-weight guidance model `key` ("sd" or "if") and its build seconds."""
    start = time.perf_counter()
    if key == "sd":
        model = random_stable_diffusion(device, dtype, **(TINY_SD if tiny else {}))
    else:
        model = random_deepfloyd_if(device, dtype, **(TINY_IF if tiny else {}))
    _sync(device)
    return model, time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_memory(device: torch.device) -> dict:
    """Allocated and reserved GPU memory in GB, now and at their peaks (empty on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


def weights(model) -> dict:
    """GB of parameters per module and their dtypes: IF's T5 keeps its `wo` layers in fp32, as the real
    loader does (guidance.deepfloyd_if.cast_as_loaded), which a plain cast would hide."""
    report = {}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(model, name, None)
        if module is None:
            continue
        by_dtype: dict[str, float] = {}
        for p in module.parameters():
            key = str(p.dtype).removeprefix("torch.")
            by_dtype[key] = by_dtype.get(key, 0.0) + p.numel() * p.element_size() / 2**30
        report[name] = {"gb": sum(by_dtype.values()), "gb_by_dtype": by_dtype}
    return report


def cost_model(config, stages: dict, latent: bool) -> dict:
    """The run's GPU seconds (steps only, as stages.gpu_cost counts them) at the measured rates, beside
    stages.gpu_cost's estimate for a full H100: the figures that calibrate that model."""
    from stages import gpu_cost

    measured = {stage: stages[stage]["step_seconds"] * getattr(config, stage).iters for stage in ("coarse", "refine")}
    estimate = {stage: getattr(config, stage).iters * sum(step(getattr(config, stage), gpu_cost.H100, latent).values())
                for stage, step in (("coarse", gpu_cost.coarse_step_seconds), ("refine", gpu_cost.refine_step_seconds))}
    return {"card": gpu_cost.H100.name, "measured_gpu_seconds": measured, "estimated_gpu_seconds": estimate,
            "measured_total": sum(measured.values()), "estimated_total": sum(estimate.values())}


def embed(model, device: torch.device) -> dict:
    """Time the prompt's embeddings (the view prompts and the negative), with the peak memory."""
    from guidance.sds import SDSLoss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    SDSLoss(model, PROMPT)
    _sync(device)
    return {"seconds": time.perf_counter() - start, **gpu_memory(device)}


def overflow_check(model, device: torch.device) -> dict:
    """fp16 noise predictions of a random image at 10 timesteps across the schedule: all finite?"""
    from guidance.sds import SDSLoss

    sds = SDSLoss(model, PROMPT)
    size = model.resolution
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    x = model.encode_images(images).float() if model.space == "latent" else images * 2 - 1
    worst, finite = 0.0, True
    with torch.no_grad():
        for t in torch.linspace(20, len(sds.alphas_cumprod) - 20, 10).long():
            a = sds.alphas_cumprod[t].to(device)
            x_t = a.sqrt() * x + (1 - a).sqrt() * torch.randn_like(x)
            cond = sds.cond_embeddings[:1].to(device)
            eps = model.predict_noise(x_t, t.view(1).to(device), cond)
            finite &= bool(torch.isfinite(eps).all())
            worst = max(worst, float(eps.abs().max()))
    return {"finite": finite, "max_abs_noise_prediction": worst, "dtype": str(model.dtype)}


def projected_seconds(config, build_s: float, embed_s: float, stages: dict) -> float:
    """Build + embedding + every step of the preset at the measured rate + export."""
    return (build_s + embed_s + stages["coarse"]["step_seconds"] * config.coarse.iters
            + stages["refine"]["step_seconds"] * config.refine.iters + stages["export"]["total_seconds"])


def check_model(key: str, args, device: torch.device, dtype: torch.dtype, deadline: float) -> dict:
    report: dict = {"guidance": MODELS[key]}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, report["build_seconds"] = build(key, device, dtype, args.tiny)
    report["after_build"] = gpu_memory(device)
    report["weights"] = weights(model)
    report["embedding"] = embed(model, device)
    report["fp16"] = overflow_check(model, device)
    config = preset(args.preset)
    config.guidance, config.device = MODELS[key], str(device)
    registry.get(MODELS[key]).adapt(config, None)
    apply_overrides(config, [*(TINY_SETTINGS if args.tiny else []), *args.overrides])
    report["guidance_facts"] = guidance_facts(model, config)
    # A stage's steps are cheap next to its set-up on a GPU; give up before the budget would break.
    if time.perf_counter() > deadline:
        report["stages"] = {"skipped": "over the time budget before the stages started"}
        return report
    report["raster_backend"] = resolved_raster_backend(config.refine.backend, device)
    stages = in_worker_thread(time_stages, model, copy.deepcopy(config), device, args.steps)
    report["stages"] = stages
    report["nonfinite_steps"] = {s: stages[s]["nonfinite_skipped"] for s in ("coarse", "refine")}
    report["projected_full_run_seconds"] = projected_seconds(
        config, report["build_seconds"], report["embedding"]["seconds"], stages)
    report["preset_steps"] = {"coarse": config.coarse.iters, "refine": config.refine.iters}
    report["cost_model"] = cost_model(config, stages, latent=model.space == "latent")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def format_report(report: dict) -> str:
    facts = report["device_facts"]
    versions = f", CUDA {facts['cuda']}, driver {facts['driver']}" if facts["cuda"] else ""
    lines = [f"GPU check on {report['device']}{versions}, models in {report['model_dtype']} "
             f"({report['preset']} preset, {report['steps']} steps/stage, "
             f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget)"]
    for key, r in report["models"].items():
        if "skipped" in r:
            lines.append(f"{key}: skipped ({r['skipped']})")
            continue
        lines.append(f"{r['guidance']}: build {r['build_seconds']:.1f} s, embed {r['embedding']['seconds']:.2f} s, "
                     f"{r['fp16']['dtype'].removeprefix('torch.')} predictions finite: {r['fp16']['finite']} (max |eps| {r['fp16']['max_abs_noise_prediction']:.2f})")
        if "skipped" in r["stages"]:
            lines.append(f"  stages skipped: {r['stages']['skipped']}")
            continue
        held = ", ".join(f"{name} {w['gb']:.2f} GB ({' + '.join(f'{d} {gb:.2f}' for d, gb in w['gb_by_dtype'].items())})"
                         for name, w in r["weights"].items())
        lines.append(f"  weights: {held}")
        lines.append(f"  {'stage':<8}{'s/step':>9}{'in model':>10}{'VAE fwd':>9}{'VAE bwd':>9}{'peak mem':>12}"
                     f"{'reserved':>10}  parts (s/step; backward includes the VAE's; peak: CUDA allocated, or RSS)")
        for stage in ("coarse", "refine"):
            s = r["stages"][stage]
            parts = ", ".join(f"{k} {v:.4f}" for k, v in s["seconds_per_step"].items())
            lines.append(f"  {stage:<8}{s['step_seconds']:>9.4f}{1 - s['outside_model_share']:>10.0%}"
                         f"{s['vae_seconds_per_step']:>9.4f}{s['vae_backward_seconds_per_step']:>9.4f}"
                         f"{_gb(s['peak_absolute_mb']):>12}{_gb(s['peak_reserved_mb']):>10}  {parts}")
        e = r["stages"]["export"]
        lines.append(f"  export   {e['total_seconds']:.1f} s, peak {_gb(e['peak_absolute_mb'])} "
                     f"(reserved {_gb(e['peak_reserved_mb'])}); raster backend {r['raster_backend']}; "
                     f"skipped non-finite steps {r['nonfinite_steps']}")
        c = r["cost_model"]
        lines.append(f"  projected full {report['preset']} run: {r['projected_full_run_seconds'] / 60:.1f} min "
                     f"({r['preset_steps']['coarse']} coarse + {r['preset_steps']['refine']} refine steps); "
                     f"GPU steps {c['measured_total']:.0f} s measured vs {c['estimated_total']:.0f} s by "
                     f"stages.gpu_cost ({c['card']})")
    return "\n".join(lines)


def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f}GB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="DreamLift GPU check kit (random weights, no download).")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sd", "if"])
    parser.add_argument("--preset", choices=PRESETS, default="standard")
    parser.add_argument("--steps", type=int, default=3, help="steps per stage (the first is not counted)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole check may take")
    parser.add_argument("--tiny", action="store_true", help="dry run: tiny models on the CPU")
    parser.add_argument("--zerogpu", action="store_true",
                        help="no GPU needed: the GPU calls of each preset on a ZeroGPU Space, against its cap and quotas")
    parser.add_argument("--model-dtype", choices=sorted(MODEL_DTYPES), default="auto",
                        help="the models' precision, as Config.model_dtype (auto: fp16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu_check.json"))
    args = parser.parse_args(argv)
    if args.zerogpu:
        from bench.zerogpu_plan import main as zerogpu_main

        return zerogpu_main()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not counted)")
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run on a CUDA machine, or `python -m bench.gpu_check --tiny` for the CPU dry run")
        return 1
    device = torch.device("cpu") if args.tiny else torch.device("cuda")
    dtype = model_dtype(args.model_dtype) or default_dtype(device)  # "auto": fp16 on CUDA, fp32 for the dry run
    start = time.perf_counter()
    deadline = start + args.budget_s
    report = {"machine": machine_info(), "device": "cpu (tiny dry run)" if args.tiny else torch.cuda.get_device_name(0),
              "device_facts": device_facts(device), "model_dtype": str(dtype).removeprefix("torch."), "preset": args.preset, "steps": args.steps, "budget_s": args.budget_s, "models": {}}
    for i, key in enumerate(args.models):
        # Each model needs roughly an equal share: one that cannot start in time is not started.
        share = (deadline - time.perf_counter()) / (len(args.models) - i)
        if i and share < 0.5 * (time.perf_counter() - start) / i:
            report["models"][key] = {"skipped": f"not started: {deadline - time.perf_counter():.0f} s of the budget left"}
            continue
        try:
            report["models"][key] = check_model(key, args, device, dtype, deadline - 0.25 * share)
        except torch.cuda.OutOfMemoryError as exc:
            report["models"][key] = {"skipped": f"out of GPU memory: {str(exc).splitlines()[0]}"}
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - start
    report["within_budget"] = report["seconds"] <= args.budget_s
    print(format_report(report))
    if not report["within_budget"]:
        print(f"note: the check took {report['seconds']:.0f} s, over its {args.budget_s:.0f} s budget")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
