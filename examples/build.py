"""Rebuild examples/results: the app's example prompts, run with the product's defaults, kept small enough for git.

    nice python -m examples.build                  # all example prompts of the primitives prior, from scratch
    python -m examples.build --only 2              # the first two (a quick check)
    python -m examples.build --keep                # add the missing ones, keep those built
    python -m examples.build --gallery-only        # rewrite the README's gallery from examples/results

Each prompt runs through `stages.pipeline.generate` with the `quick` preset and seed 0 (what a visitor's
first run on a CPU server gets). Per prompt, examples/results/<slug>/ keeps model.glb, preview.png (the
run's last preview), turntable.mp4 (fewer, smaller frames when the run's is too big), strip.png (a few
turntable frames side by side, for the README) and facts.json (from the run's run.json, plus the commit).
Nothing here is edited by hand: the app and the README read these folders as they are.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from examples.ready import RESULTS, slug

SEED = 0
PRESET = "quick"
GUIDANCE = "primitives"
MAX_EXAMPLE_BYTES = 1_500_000  # one example's folder, bytes
MAX_ZIP_BYTES = 300_000  # model.zip is kept only when it is this small (the GLB always is)
STRIP_FRAMES = 4  # turntable frames in strip.png
SMALL_TURNTABLE = (24, 192)  # (frames, px) of the shrunk turntable when the run's is too big
README = Path(__file__).resolve().parents[1] / "README.md"
GALLERY_START, GALLERY_END = "<!-- examples:start -->", "<!-- examples:end -->"  # the README's gallery, written here


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_config():
    """What a visitor's first run on a CPU server gets: the quick preset, seed 0, the primitives prior."""
    from stages.config import preset

    config = preset(PRESET)
    config.seed, config.guidance = SEED, GUIDANCE
    return config


def run_example(prompt: str, run_dir: Path, config) -> tuple[dict, np.ndarray | None]:
    """Run `prompt` with `config` into `run_dir`; (its record, its last preview image)."""
    from stages.pipeline import generate
    from stages.runs import RunRecord

    last_preview, shown = None, ""
    for event in generate(prompt, config, run_dir=run_dir):
        if event.preview is not None:
            last_preview = event.preview
        line = f"  {event.stage} {event.step}/{event.total}" if event.total else f"  {event.stage}: {event.message}"
        if event.stage != shown or event.step == event.total:  # one line per stage and its end, not per step
            print(line, flush=True)
            shown = event.stage
    return RunRecord.load(run_dir), last_preview


def read_frames(video: Path) -> list[np.ndarray]:
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(video), format="FFMPEG")
    try:
        return [np.asarray(frame) for frame in reader]
    finally:
        reader.close()


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    from stages.export_files import write_video as write

    write(str(path), frames, fps)


def shrink_frames(frames: list[np.ndarray], count: int, size: int) -> list[np.ndarray]:
    """`count` frames evenly over the orbit, resized to `size` px (area average via PIL)."""
    from PIL import Image

    picked = [frames[i] for i in np.linspace(0, len(frames), count, endpoint=False).astype(int)]
    return [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in picked]


def strip(frames: list[np.ndarray]) -> np.ndarray:
    """STRIP_FRAMES views a quarter turn apart, side by side: [H, STRIP_FRAMES * W, 3]."""
    picked = [frames[i] for i in np.linspace(0, len(frames), STRIP_FRAMES, endpoint=False).astype(int)]
    return np.concatenate(picked, axis=1)


def keep_example(prompt: str, record, preview, run_dir: Path, out: Path, code: str) -> dict:
    """Copy the small files of one run (`record`: its `stages.runs.RunRecord`) into `out`; returns facts.json's content."""
    from PIL import Image

    out.mkdir(parents=True)
    outputs = record.outputs
    shutil.copyfile(outputs["glb"], out / "model.glb")
    if Path(outputs.get("zip") or "").is_file() and Path(outputs["zip"]).stat().st_size <= MAX_ZIP_BYTES:
        shutil.copyfile(outputs["zip"], out / "model.zip")
    frames = read_frames(Path(outputs["turntable"]))
    fps = record.config["export"]["turntable_fps"]
    shutil.copyfile(outputs["turntable"], out / "turntable.mp4")
    if sum(f.stat().st_size for f in out.iterdir()) > MAX_EXAMPLE_BYTES * 0.8:
        count, size = SMALL_TURNTABLE
        write_video(out / "turntable.mp4", shrink_frames(frames, count, size), max(1, fps * count // len(frames)))
    Image.fromarray(strip(frames)).save(out / "strip.png", optimize=True)
    Image.fromarray(preview if preview is not None else frames[0]).save(out / "preview.png", optimize=True)
    facts = {
        "prompt": prompt, "preset": record.preset, "seed": record.seed, "guidance": record.guidance,
        "device": record.device, "seconds": round(record.total_seconds or 0.0, 1),
        "minutes": round((record.total_seconds or 0.0) / 60, 1),
        "stage_seconds": {k: round(v, 1) for k, v in record.stage_seconds.items()},
        "commit": code, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    if total > MAX_EXAMPLE_BYTES:
        print(f"warning: {out} holds {total / 1e6:.2f} MB, over {MAX_EXAMPLE_BYTES / 1e6:.1f} MB", file=sys.stderr)
    return facts


def main(argv=None) -> int:
    from guidance import registry

    parser = argparse.ArgumentParser(description="Rebuild examples/results from the app's example prompts.")
    parser.add_argument("--only", type=int, default=0, help="build only the first N prompts (0 = all)")
    parser.add_argument("--keep", action="store_true", help="keep the results already built (add the missing ones)")
    parser.add_argument("--gallery-only", action="store_true", help="only rewrite the README's gallery from the results")
    args = parser.parse_args(argv)
    prompts = registry.get(GUIDANCE).examples()
    if args.gallery_only:
        write_gallery(prompts, RESULTS, README)
        return 0
    build(prompts[: args.only] if args.only > 0 else prompts, RESULTS, default_config(), keep=args.keep)
    write_gallery(prompts, RESULTS, README)
    return 0


def gallery(prompts: list[str], root: Path, base: Path) -> str:
    """A Markdown table: per built example, its strip (paths relative to `base`) and its run's facts."""
    rows = ["| example | four views of the result (turntable frames) |", "| --- | --- |"]
    for prompt in prompts:
        folder = root / slug(prompt)
        if not (folder / "facts.json").is_file() or not (folder / "strip.png").is_file():
            continue
        facts = json.loads((folder / "facts.json").read_text())
        where = f"{facts['preset']}, seed {facts['seed']}, {facts['minutes']} min on {facts['device']}"
        rows.append(f"| \"{prompt}\"<br>{where} | ![{prompt}]({(folder / 'strip.png').relative_to(base)}) |")
    return "\n".join(rows) if len(rows) > 2 else "(no example built yet: `python -m examples.build`)"


def write_gallery(prompts: list[str], root: Path, readme: Path) -> None:
    """Replace the README's gallery (between its two markers) with the examples built now."""
    text = readme.read_text()
    if GALLERY_START not in text or GALLERY_END not in text:
        print(f"warning: {readme} has no {GALLERY_START} ... {GALLERY_END} section; gallery not written", file=sys.stderr)
        return
    head, rest = text.split(GALLERY_START, 1)
    tail = rest.split(GALLERY_END, 1)[1]
    readme.write_text(f"{head}{GALLERY_START}\n{gallery(prompts, root, readme.parent)}\n{GALLERY_END}{tail}")


def build(prompts: list[str], root: Path, config, keep: bool = False) -> None:
    """Run every prompt with (a copy of) `config` and keep its small files under root/<slug>/."""
    import copy

    code = commit()  # the code the runs use: HEAD when the build starts (commits made meanwhile do not count)
    if root.exists() and not keep:
        shutil.rmtree(root)  # from scratch: nothing stale stays
    root.mkdir(parents=True, exist_ok=True)
    for number, prompt in enumerate(prompts, start=1):
        out = root / slug(prompt)
        if out.exists():
            print(f"[{number}/{len(prompts)}] {prompt!r}: kept", flush=True)
            continue
        print(f"[{number}/{len(prompts)}] {prompt!r}", flush=True)
        with tempfile.TemporaryDirectory(prefix="dreamlift-example-") as tmp:
            run_dir = Path(tmp) / "run"
            record, preview = run_example(prompt, run_dir, copy.deepcopy(config))
            facts = keep_example(prompt, record, preview, run_dir, out, code)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"  kept {out} ({size / 1e6:.2f} MB, the run took {facts['minutes']} min)", flush=True)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"{root}: {total / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
