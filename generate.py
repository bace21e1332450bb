"""Command line: text in, textured mesh out.

    python generate.py "a red cube" --preset quick --seed 0 --out OUT_DIR
    python generate.py --prompts prompts.txt --out OUT_ROOT       # one sub-folder per line
    python generate.py "a red cube" --stop-after coarse           # export the coarse NeRF's mesh
    python generate.py "a red cube" --set coarse.iters=300 --set refine.resolution=96
    python generate.py --resume OUT_DIR                           # continue after the last finished stage
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from batch.cli import add_arguments as add_ray_arguments
from guidance import registry
from stages.config import PRESETS, STAGES, apply_overrides, preset


class ArgumentError(ValueError):
    """A bad command line; main() prints it as one line (argparse would add the usage block)."""


def _refuse(message: str):
    raise ArgumentError(message)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DreamLift: text to textured 3D mesh (OBJ + MTL + PNG, GLB).")
    parser.error = _refuse  # one readable line, see main()
    parser.add_argument("prompt", nargs="?", help="what to make, e.g. 'a red cube'")
    parser.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--preset", default="quick", choices=PRESETS, help="quick (CPU), standard (one GPU), high")
    parser.add_argument("--guidance", default="auto", choices=registry.choices(), help="the 2D prior to distil")
    parser.add_argument("--model-id", help="hub id or local folder of the guidance model")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0 .. 2^32-1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--out", type=Path, help="output folder (with --prompts: the root of one folder per prompt)")
    parser.add_argument("--stop-after", choices=STAGES, default="export", help="last stage to train")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. coarse.iters=300 (repeatable)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run (or --ray batch)")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    given = sum(x is not None for x in (args.prompt, args.prompts, args.resume))
    if given != 1:
        parser.error("give exactly one of: a prompt, --prompts FILE, --resume RUN_DIR")
    if args.model_id is not None:
        check_model_id(args)
    return args


def check_model_id(args: argparse.Namespace) -> None:
    """--model-id applies to a guidance model with weights only (the app's Model id box says the same)."""
    from stages.plan import resolve_device

    args.model_id = args.model_id.strip() or None
    try:
        device = resolve_device(args.device)
    except ValueError:
        return  # the run reports the device itself
    name = registry.resolve_name(args.guidance, device)
    spec = registry.get(name)
    if args.model_id is None or spec.takes_model_id:
        return
    with_ids = " or ".join(f"--guidance {n}" for n in registry.names() if registry.get(n).takes_model_id)
    picked = f" (--guidance {args.guidance} picks it on {device})" if args.guidance != name else ""
    _refuse(f"{spec.title}{picked} has no weights, so it takes no model id: drop --model-id, or pass {with_ids}")


def build_config(args: argparse.Namespace):
    config = preset(args.preset)
    config.guidance, config.model_id, config.seed = args.guidance, args.model_id, args.seed
    config.device, config.stop_after = args.device, args.stop_after
    return apply_overrides(config, args.overrides)


def run_one(plan, out_dir: Path | None, resume: bool = False) -> dict:
    """Run a resolved plan (`stages.plan.resolve`) into out_dir (None: a new folder under outputs/)."""
    from tqdm import tqdm

    from stages.pipeline import run_plan

    print(describe_guidance(plan.device, plan.guidance, plan.config.model_id), flush=True)
    terminal = sys.stderr.isatty()
    bar, stage, paths = None, None, {}
    try:
        kwargs = {"run_dir": out_dir} if out_dir is not None else {"out_root": "outputs"}
        for event in run_plan(plan, resume=resume, **kwargs):
            if event.stage != stage and event.total:
                if bar is not None:
                    bar.close()
                stage = event.stage
                # The rate counts from the first reported step (a stage's first step includes its warm-up), as
                # an average; off a terminal (a log file) the bar is redrawn every 30 s instead of every 0.1 s.
                bar = tqdm(total=event.total, initial=event.step, desc=stage, unit="step", leave=True, smoothing=0,
                           mininterval=0.1 if terminal else 30.0, dynamic_ncols=terminal)
            if bar is not None and event.stage == stage and event.total:
                if event.loss is not None:
                    bar.set_postfix_str(f"loss {event.loss:.3g}", refresh=False)
                bar.update(event.step - bar.n)
            if event.stage == "done":
                if bar is not None:
                    bar.close()
                paths = event.paths or {}
                print(f"{event.message}: {event.run_dir}")
    finally:
        if bar is not None:
            bar.close()
    return paths


def describe_guidance(device, spec, model_id: str | None) -> str:
    """One line naming the guidance model (a guidance.registry spec, and its id) and the device the run uses."""
    model = f" '{model_id or spec.default_model_id}'" if spec.takes_model_id else " (offline, no weights)"
    return f"guidance: {spec.name}{model} on {device}"


def read_prompts(path: Path, config) -> list:
    """The plans of a file's prompts (one a line, '#' comments), all resolved before the first run starts."""
    from stages.plan import resolve

    plans = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            plans.append(resolve(line, config))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
    if not plans:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return plans


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ArgumentError as exc:
        print(f"error: {one_line(exc)} (see --help)", file=sys.stderr)
        return 2
    try:
        if args.ray is not None:  # a batch on a Ray cluster: batch/
            from batch.cli import main as ray_main

            return ray_main(args, build_config)
        from stages.plan import resolve

        if args.resume is not None:
            from stages.runs import clear_stop, load_run_config

            prompt, config = load_run_config(args.resume)
            apply_overrides(config, args.overrides)
            plan = resolve(prompt, config)
            clear_stop(args.resume)  # resumed on purpose: an earlier cancel no longer holds
            run_one(plan, args.resume, resume=True)
            return 0
        config = build_config(args)
        if args.prompts is not None:
            plans = read_prompts(args.prompts, config)
            from stages.runs import slugify

            root = args.out or Path("outputs")
            for i, plan in enumerate(plans):
                run_one(plan, root / f"{i:03d}-{slugify(plan.prompt)}")
            return 0
        run_one(resolve(args.prompt, config), args.out)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one readable line, no traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
