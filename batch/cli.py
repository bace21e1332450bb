"""`generate.py --ray`: the command-line side of a Ray batch (its arguments, start, resume, summary)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                        help="run the --prompts batch on a Ray cluster: 'auto' (the default) joins the cluster "
                             "on this machine or starts one; an address (HOST:6379) joins that cluster")
    parser.add_argument("--ray-cpus-per-run", type=int, default=1, metavar="N",
                        help="with --ray on a cluster without GPUs: CPUs (and torch threads) per run")


def main(args: argparse.Namespace, build_config) -> int:
    """Run a new batch (--prompts FILE) or continue one (--resume BATCH_DIR); returns the exit code."""
    from batch.plan import check_prompts, load_plan, new_plan, read_prompt_lines
    from batch.ray_runner import open_cluster, run_batch
    from stages.config import apply_overrides

    # 1. Read the batch: the prompts file and the settings, or the batch.json of an earlier one.
    if args.resume is not None:
        plan = load_plan(args.resume.resolve())
        apply_overrides(plan.config, args.overrides)
        source, lines = plan.root / "batch.json", [(r.index + 1, r.prompt) for r in plan.runs]
    elif args.prompts is not None:
        plan, source, lines = None, args.prompts, read_prompt_lines(args.prompts)
    else:
        raise ValueError("--ray runs a batch: give --prompts FILE, or --resume BATCH_DIR to continue one")
    config = plan.config if plan is not None else build_config(args)

    # 2. Join the cluster; check every prompt for the workers' guidance model before any run starts.
    cluster = open_cluster(args.ray, config.device, args.ray_cpus_per_run)
    try:
        prompts = check_prompts(source, lines, config, cluster.worker_device)
        if plan is None:
            root = (args.out or Path("outputs")).resolve()
            plan = new_plan(root, prompts, config, prompts_file=str(args.prompts))
            root.mkdir(parents=True, exist_ok=True)
        todo = len(plan.todo())
        print(f"batch: {todo} of {len(plan.runs)} runs to do on {cluster.slots} Ray worker slot(s) "
              f"({cluster.mode}) -> {plan.root}")
        run_batch(plan, cluster, resume=args.resume is not None)
    finally:
        cluster.close()

    # 3. Summary.
    bad = [r for r in plan.runs if r.status != "finished"]
    print(f"batch: {len(plan.runs) - len(bad)} of {len(plan.runs)} runs finished; see {plan.root / 'batch.json'}")
    return 1 if bad else 0
