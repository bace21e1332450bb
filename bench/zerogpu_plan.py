"""`python -m bench.gpu_check --zerogpu`: what each preset asks of a ZeroGPU Space, without a GPU.

For each preset with Stable Diffusion: the GPU calls a run makes there (one per SDS stage; the export runs
outside), the seconds each call asks for (the upper end of stages.gpu_cost's estimate, what the host
charges), the projected GPU time of the whole run (central estimate, model loads left out) and on a full
H100, against the per-call cap and the daily quotas. Exits 0 only when the ZeroGPU default preset fits every
call under the cap and the whole run under 120 s.
"""
from __future__ import annotations

from stages.config import PRESETS, preset
from stages.gpu_budget import (
    ZEROGPU_CALL_CAP,
    ZEROGPU_PRESET,
    ZEROGPU_QUOTAS,
    call_requests,
    projected_seconds,
)
from stages.gpu_cost import CARDS, UNCERTAINTY, run_gpu_seconds

RUN_TARGET_SECONDS = 120  # a whole run of the default preset on ZeroGPU: one anonymous visitor's daily quota
GUIDANCE = "stable-diffusion"


def plan_rows(guidance: str = GUIDANCE) -> list[dict]:
    rows = []
    for name in PRESETS:
        config = preset(name)
        requests = call_requests(config, guidance)
        asked = sum(seconds for _, seconds in requests)
        rows.append({
            "preset": name,
            "calls": requests,
            "requested_total": asked,
            "projected_zerogpu": projected_seconds(config, guidance),
            "projected_h100": run_gpu_seconds(config, CARDS["h100"]),
            "fits_cap": all(seconds <= ZEROGPU_CALL_CAP for _, seconds in requests),
            "quotas": [who for who, quota in ZEROGPU_QUOTAS.items() if asked <= quota],
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"ZeroGPU plan with {GUIDANCE} (cap {ZEROGPU_CALL_CAP} s per call; requests = estimate x {UNCERTAINTY} "
             f"with the model load; quotas per day: " + ", ".join(f"{k} {v} s" for k, v in ZEROGPU_QUOTAS.items()) + ")",
             f"{'preset':<10}{'GPU calls (s asked)':<34}{'asked':>8}{'GPU s':>9}{'on H100':>9}  fits a call  one run a day for"]
    for r in rows:
        calls = ", ".join(f"{stage} {seconds}" for stage, seconds in r["calls"])
        lines.append(f"{r['preset']:<10}{calls:<34}{r['requested_total']:>8}{r['projected_zerogpu']:>9.0f}"
                     f"{r['projected_h100']:>9.0f}  {'yes' if r['fits_cap'] else 'NO':<11}  {', '.join(r['quotas']) or '-'}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> tuple[bool, str]:
    default = next(r for r in rows if r["preset"] == ZEROGPU_PRESET)
    ok = default["fits_cap"] and default["projected_zerogpu"] <= RUN_TARGET_SECONDS
    return ok, (f"default preset '{ZEROGPU_PRESET}': every call under {ZEROGPU_CALL_CAP} s: "
                f"{'yes' if default['fits_cap'] else 'no'}; whole run {default['projected_zerogpu']:.0f} s of GPU "
                f"(target {RUN_TARGET_SECONDS} s), {default['requested_total']} s asked: {'OK' if ok else 'FAILS'}")


def main() -> int:
    rows = plan_rows()
    print(format_rows(rows))
    ok, line = verdict(rows)
    print(line)
    return 0 if ok else 1
