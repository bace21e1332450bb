"""Smoke tests of the benchmarks: bench.quality --quick and bench.speed's CPU path, in-process and tiny."""
import json
import math

import numpy as np
import pytest
import torch

from bench import coarse_quality, mesh_level, quality, random_models, refine_gain, solid_checks, speed, uv_fill
from guidance.primitive_shapes import COLORS, UnknownPromptError, parse_prompt, primitive_mesh
from stages.config import preset
from stages.export import ExportConfig, export
from stages.refine import TIMING_PARTS
from stages.runs import slugify

TINY = [
    "prior.resolution=16", "prior.renders_per_view=4",
    "coarse.iters=3", "coarse.resolution=16", "coarse.volume.num_samples=16",
    "refine.iters=2", "refine.resolution=16", "refine.grid_resolution=16",
    "export.texture_size=64", "export.turntable=false",
]


def _sets(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.mark.slow
def test_quality_quick_writes_one_measured_row_per_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "CHAMFER_POINTS", 2000)
    monkeypatch.setattr(quality, "VOLUME_RESOLUTION", 32)
    code = quality.main(["--quick", "--out", str(tmp_path / "quality"), *_sets(TINY)])
    assert code == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    rows = report["rows"]
    assert [r["prompt"] for r in rows] == list(quality.QUICK_PROMPTS) and report["seeds"] == [0]
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        for key in ("silhouette_iou", "silhouette_iou_min", "volume_iou", "retrieval", "retrieval_reference"):
            assert 0.0 <= row[key] <= 1.0, (key, row[key])
        assert row["silhouette_iou_min"] <= row["silhouette_iou"]
        assert 0.0 < row["chamfer"] < 4.0 and math.isfinite(row["chamfer"])
        # The error is the distance from the reported mean texture colour to the prompt's colour.
        target = np.array(COLORS[parse_prompt(row["prompt"])[0]])
        assert row["color_error"] == pytest.approx(np.linalg.norm(np.array(row["mean_color"]) - target), abs=1e-3)
        assert len(row["retrieved"]) == 8 and row["retrieval"] == sum(
            r == row["prompt"] for r in row["retrieved"]) / 8
        assert row["faces"] > 0
        assert row["genus_ok"] == (row["genus"] == 0) and 0.0 < row["fill"] <= 1.0  # cube and sphere: genus 0
        assert row["albedo_up_down"] > 0 and (row["base_gap"] is None) == (row["shape"] == "sphere")
        assert row["refine_gain"] == pytest.approx(row["iou_refined"] - row["iou_start"])
        assert set(row["stage_seconds"]) == {"coarse", "refine", "export"}
        assert all(v > 0 for v in row["stage_seconds"].values())
        assert sum(row["stage_seconds"].values()) <= row["total_seconds"] + 0.05  # the stages ran inside the timed run
        run = json.loads((tmp_path / "quality" / f"{slugify(row['prompt'])}-seed0" / "run.json").read_text())
        assert run["config"]["coarse"]["iters"] == 3 and run["stage_stats"]["export"]["faces"] == row["faces"]
    overall = report["summary"]["overall"]
    assert overall["silhouette_iou"] == pytest.approx(np.mean([r["silhouette_iou"] for r in rows]))

    # The same runs, read back by the refine-gain report: the mesh before and after refinement.
    assert refine_gain.main([str(tmp_path / "quality"), "--json", str(tmp_path / "gain.json")]) == 0
    gain = json.loads((tmp_path / "gain.json").read_text())
    assert sorted(g["prompt"] for g in gain) == sorted(quality.QUICK_PROMPTS)
    for g in gain:
        run_dir = tmp_path / "quality" / g["run"]
        refined = torch.load(run_dir / "refine.pt", weights_only=True)
        assert g["faces_after"] == refined["faces"].shape[0] > 0
        assert 0.0 <= g["iou_before"] <= 1.0 and 0.0 <= g["iou_after"] <= 1.0
        assert g["grid"] == json.loads((run_dir / "run.json").read_text())["config"]["refine"]["grid_resolution"]
    with pytest.raises(SystemExit):
        refine_gain.main([str(tmp_path / "no-such-folder")])
    # The same runs' coarse meshes at two fixed opacity targets and the automatic one.
    assert mesh_level.main([str(tmp_path / "quality"), "--opacities", "0.5", "0.8", "--json", str(tmp_path / "level.json")]) == 0
    levels = {r["run"]: r for r in json.loads((tmp_path / "level.json").read_text())}
    for g in gain:
        row = levels[g["run"]]
        assert row["iou_auto"] == pytest.approx(g["iou_before"], abs=1e-6)  # what refine started from
        assert 0.25 <= row["auto_opacity"] <= 0.9 and all(0.0 <= row[k] <= 1.0 for k in ("iou_0.5", "iou_0.8"))
    with pytest.raises(SystemExit):
        mesh_level.main([str(tmp_path / "quality"), "--opacities", "1.5"])
    # The same runs' refined meshes unwrapped again as their export did: the same texture fill.
    fills = {name: uv_fill.check(v, f, size)["fill"] for name, v, f, size in uv_fill.run_meshes([tmp_path / "quality"])}
    assert sorted(fills) == sorted(g["run"] for g in gain)
    for row in rows:
        assert fills[f"{slugify(row['prompt'])}-seed0"] == pytest.approx(row["fill"], abs=0.01)
    # The same runs' start surfaces: the solid checks, and the colour the coarse field hands the refine stage.
    runs = [str(tmp_path / "quality" / f"{slugify(row['prompt'])}-seed0") for row in rows]
    assert solid_checks.main([*runs, "--initial", "2", "--json", str(tmp_path / "initial.json")]) == 0
    starts = json.loads((tmp_path / "initial.json").read_text())
    assert [s["prompt"] for s in starts] == [row["prompt"] for row in rows]
    for start in starts:
        assert start["run"].endswith("tunnel 2") and 0.0 <= start["color_error"] <= math.sqrt(3)


def test_measure_scores_the_true_primitive_perfectly_and_a_wrong_prompt_badly(tmp_path, monkeypatch):
    from guidance.primitives import PrimitivesPrior

    monkeypatch.setattr(quality, "CHAMFER_POINTS", 2000)
    monkeypatch.setattr(quality, "VOLUME_RESOLUTION", 32)

    cube = primitive_mesh("cube")
    red = torch.tensor(COLORS["red"])
    result = export(torch.tensor(np.array(cube.vertices), dtype=torch.float32), torch.tensor(np.array(cube.faces)),
                    lambda p: red.expand(len(p), 3), tmp_path, ExportConfig(texture_size=64, turntable=False))
    prior = PrimitivesPrior(resolution=16, renders_per_view=4, log=lambda *_: None)
    right = quality.measure(result.paths["obj"], "a red cube", prior)
    assert right["silhouette_iou"] > 0.98 and right["volume_iou"] > 0.95
    assert right["chamfer"] < 0.05 and right["color_error"] < 0.02 and right["faces"] == 12
    # The exported cube renders like the true one, so it is retrieved exactly as often.
    assert right["retrieval"] == right["retrieval_reference"]
    wrong = quality.measure(result.paths["obj"], "a blue torus", prior)
    assert wrong["silhouette_iou"] < 0.8 and wrong["volume_iou"] < 0.5 and wrong["chamfer"] > 0.1
    assert wrong["color_error"] > 0.8 and wrong["retrieval"] == 0.0


def test_a_crashing_run_is_an_error_row_and_a_nonzero_exit(tmp_path, monkeypatch):
    from stages import pipeline

    def crash(prompt, config, **kwargs):
        raise RuntimeError(f"boom on {prompt}")

    monkeypatch.setattr(pipeline, "run_to_completion", crash)
    code = quality.main(["--prompts", "a green cone", "--seeds", "3", "--out", str(tmp_path / "q"), *_sets(TINY)])
    assert code == 1
    report = json.loads((tmp_path / "q.json").read_text())
    (row,) = report["rows"]
    assert row["status"] == "error" and "boom on a green cone" in row["error"] and row["seed"] == 3
    assert report["summary"]["errors"] == 1 and report["summary"]["overall"] == {}



def test_text_only_turns_the_elevation_kernel_off_after_every_set(tmp_path, monkeypatch, capsys):
    args = quality.parse_args(["--text-only", "--set", "prior.elevation_sigma=3", "--out", str(tmp_path / "q")])
    ((name, _, overrides, out_dir, json_path),) = quality.variants(args)
    assert name == "text-only" and overrides == ["prior.elevation_sigma=3", "prior.elevation_sigma=0"]
    assert (out_dir, json_path) == (tmp_path / "q-text-only", tmp_path / "q-text-only.json")
    with pytest.raises(SystemExit):
        quality.parse_args(["--text-only", "--both"])

    from stages import pipeline

    sigmas = []

    def crash(prompt, config, run_dir, **kwargs):
        sigmas.append((run_dir.parent.name, config.prior.elevation_sigma))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "run_to_completion", crash)
    assert quality.main(["--both", "--prompts", "a red cube", "--seeds", "0", "--out", str(tmp_path / "q")]) == 1
    assert sigmas == [("q", None), ("q-text-only", 0.0)]
    reports = [json.loads((tmp_path / f"{stem}.json").read_text()) for stem in ("q", "q-text-only")]
    assert [r["variant"] for r in reports] == ["default", "text-only"]
    printed = capsys.readouterr().out
    assert printed.index("== default:") < printed.index("== text-only:") and "stands for the real" in printed

@pytest.mark.slow
def test_coarse_quality_measures_each_run(tmp_path, capsys):
    sets = _sets(["prior.resolution=16", "prior.renders_per_view=4", "coarse.iters=3", "coarse.resolution=16",
                  "coarse.preview_every=0"])
    code = coarse_quality.main(["--prompts", "a red cube", "--seeds", "0", "1", "--json", str(tmp_path / "c.json"), *sets])
    assert code == 0
    rows = json.loads((tmp_path / "c.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a red cube", 0), ("a red cube", 1)]
    for row in rows:
        assert 0.0 <= row["silhouette_iou_min"] <= row["silhouette_iou"] <= 1.0
        albedo = np.array(row["mean_albedo"])
        assert row["color_error"] == pytest.approx(np.linalg.norm(albedo - np.array(COLORS["red"])), abs=1e-3)
        # The timed stage holds its 3 steps, each at least the sum of its timed parts.
        assert row["seconds"] + 0.05 >= 3 * sum(row["step_split_s"].values()) - 1e-3
        assert set(row["step_split_s"]) == {f"{k}_s_per_step" for k in ("render", "guidance", "backward", "optimizer")}
    assert "silhouette IoU" in capsys.readouterr().out
    with pytest.raises(UnknownPromptError, match="does not know the prompt 'a teapot'"):
        coarse_quality.main(["--prompts", "a teapot", "--json", str(tmp_path / "x.json")])


def test_speed_cpu_path_times_every_part_of_every_stage(tmp_path):
    out = tmp_path / "speed.json"
    assert speed.main(["--steps", "2", "--devices", "cpu", "cuda", "--out", str(out), *_sets(TINY)]) == 0
    report = json.loads(out.read_text())
    cpu = report["cpu"]
    assert set(cpu["coarse"]["seconds_per_step"]) == {"render", "guidance", "backward", "optimizer"}
    assert set(cpu["refine"]["seconds_per_step"]) == set(TIMING_PARTS)
    for stage in ("coarse", "refine"):
        r = cpu[stage]
        assert r["steps"] == 2 and r["measured_steps"] == 1 and r["resolution"] == 16
        assert all(v >= 0 for v in r["seconds_per_step"].values()) and r["step_seconds"] > 0
        assert 0 < r["model_seconds_per_step"] <= r["seconds_per_step"]["guidance"]
        assert 0.0 <= r["outside_model_share"] < 1.0 and math.isfinite(r["peak_memory_mb"])
    assert set(cpu["export"]["seconds"]) == {"clean", "unwrap", "bake", "write", "turntable"}
    assert cpu["export"]["faces"] > 0 and cpu["export"]["texture_size"] == 64
    if not torch.cuda.is_available():
        assert report["cuda"] == {"skipped": speed.NO_CUDA}


def test_random_stable_diffusion_builds_a_working_latent_guidance_model():
    from guidance.sds import SDSConfig, SDSLoss

    unet = dict(random_models.SD21_BASE_UNET, sample_size=4, block_out_channels=(32, 64), attention_head_dim=(2, 4),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32)
    vae = dict(random_models.SD_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
    text = dict(random_models.SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = random_models.random_stable_diffusion(torch.device("cpu"), torch.float32, unet=unet, vae=vae, text=text)
    assert model.resolution == 8 and model.space == "latent" and model.alphas_cumprod.shape == (1000,)
    cond = model.encode_prompt(["a red cube", "a red cube", "a blue torus"])
    assert cond.shape == (3, 77, 32) and torch.equal(cond[0], cond[1]) and not torch.equal(cond[0], cond[2])
    images = torch.rand(2, 8, 8, 3, requires_grad=True)
    timed = speed.TimedGuidance(model, torch.device("cpu"))
    loss, info = SDSLoss(timed, "a red cube", SDSConfig())(images, ["front", "side"], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert timed.seconds > 0
    assert 0 < timed.vae_backward_seconds < 60  # the encoder's backward, timed from inside loss.backward()
    # Encoded once each: "a red cube", "a blue torus", then SDSLoss's 4 view prompts and "" (duplicates come from the cache).
    assert model.embeddings.encoded_texts == 7


@pytest.mark.slow
def test_gpu_check_dry_run_measures_both_models_through_every_stage(tmp_path, one_thread):
    from bench import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--steps", "2", "--preset", "fast", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"sd", "if"} and report["within_budget"]
    assert report["device_facts"]["gpu"] is None and report["model_dtype"] == "float32"
    fast = preset("fast")
    for key, guidance, cfg in (("sd", "stable-diffusion", 100.0), ("if", "deepfloyd-if", 20.0)):
        r = report["models"][key]
        assert r["guidance"] == guidance and r["fp16"]["finite"]
        assert r["nonfinite_steps"] == {"coarse": 0, "refine": 0}
        for stage in ("coarse", "refine"):
            s = r["stages"][stage]
            assert s["step_seconds"] > 0 and 0 < 1 - s["outside_model_share"] <= 1
            assert s["peak_absolute_mb"] > 0 and s["peak_reserved_mb"] is None  # the process's RSS; no allocator here
            assert 0 <= s["vae_backward_seconds_per_step"] <= s["seconds_per_step"]["backward"]
            assert (s["vae_backward_seconds_per_step"] > 0) == (key == "sd")  # a latent model's encoder, backward
            assert (s["vae_seconds_per_step"] > 0) == (key == "sd")
        assert set(r["stages"]["refine"]["seconds_per_step"]) >= {"marching", "rasterize", "guidance", "backward"}
        assert r["raster_backend"] == "torch"  # no CUDA here
        assert r["guidance_facts"]["model_dtype"] == "float32" and r["guidance_facts"]["guidance_scale"]["coarse"]["start"] == cfg
        assert set(r["weights"]) == ({"unet", "vae", "text_encoder"} if key == "sd" else {"unet", "text_encoder"})
        assert all(w["gb"] > 0 and set(w["gb_by_dtype"]) == {"float32"} for w in r["weights"].values())
        steps = {stage: r["stages"][stage]["step_seconds"] * getattr(fast, stage).iters for stage in ("coarse", "refine")}
        assert r["projected_full_run_seconds"] > sum(steps.values())  # the fast preset's steps, plus build and export
        cost = r["cost_model"]
        assert cost["measured_gpu_seconds"] == pytest.approx(steps) and cost["estimated_total"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_a_gpu_says_so(capsys, tmp_path):
    from bench import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 1
    assert "no CUDA GPU" in capsys.readouterr().out


def test_quality_table_shows_the_solid_checks_per_run():
    def solid(**changes):
        checks = {"shells": 1, "closed_shells": 1, "euler": 2, "euler_expected": 2, "euler_ok": True,
                  "self_intersections": 0, "cavity_share": 0.0, "angle_p95": 12.5, "angle_max": 80.0,
                  "pit_max": 0.01, "bulge_max": 0.02}
        checks.update(changes)
        checks["clean"] = checks["shells"] == 1 and checks["euler_ok"] and checks["angle_p95"] <= 20 and (
            checks["pit_max"] is None or checks["pit_max"] <= 0.03)
        return checks

    cells = {"silhouette_iou": 0.9, "volume_iou": 0.9, "chamfer": 0.01, "color_error": 0.02, "retrieval": 1.0,
             "retrieval_reference": 1.0, "faces": 100, "stage_seconds": {"coarse": 1.0}}
    rows = [
        {"prompt": "a red cube", "seed": 0, "status": "ok", **cells, "solid": solid()},
        {"prompt": "a red torus", "seed": 1, "status": "ok", **cells,
         "solid": solid(euler=-4, euler_expected=0, euler_ok=False, angle_p95=33.0, pit_max=None, bulge_max=None)},
        {"prompt": "a red cone", "seed": 0, "status": "error", "error": "boom"},
    ]
    summary = quality.summarize(rows)
    assert summary["solid"]["runs"] == 2 and summary["solid"]["meeting"]["euler"] == 1
    assert summary["solid"]["meeting"]["angle_p95 <= 20"] == 1 and summary["solid"]["meeting"]["all"] == 1
    assert summary["solid"]["worst"]["angle_p95"] == 33.0 and summary["solid"]["worst"]["pit_max"] == 0.01
    table = quality.format_table(rows, summary)
    head = next(line for line in table.splitlines() if line.startswith("prompt") and "shells" in line)
    assert all(word in head for word in ("euler", "want", "self-x", "cavity", "ang p95", "pit", "bulge"))
    cube = next(line for line in table.splitlines() if line.startswith("a red cube") and line.rstrip().endswith("yes"))
    assert cube.split()[4:7] == ["1", "2", "2"]
    torus = next(line for line in table.splitlines() if line.startswith("a red torus") and line.rstrip().endswith("NO"))
    assert torus.split()[4:7] == ["1", "-4", "0"] and "33.0" in torus and torus.split()[-3:-1] == ["-", "-"]
    assert "euler 1/2" in table and "all 1/2" in table
    assert "shells" not in quality.format_table([{**rows[0], "solid": None}], quality.summarize(rows[:1]))


def test_client_checks_without_the_clients_and_their_table(tmp_path, monkeypatch):
    from bench import client_checks

    monkeypatch.setattr(client_checks.shutil, "which", lambda name: None)
    (tmp_path / "model.obj").write_text("v 0 0 0\n")
    rows = client_checks.check_run(tmp_path)
    assert [r["file"] for r in rows] == ["model.obj"] and rows[0]["blender"] is None and rows[0]["assimp"] is None
    merged = {"vertices": 8, "faces": 12, "non_manifold_edges": 0, "boundary_edges": 0, "parts": 1,
              "at_blender_default": {"vertices": 7, "faces": 10, "non_manifold_edges": 2}}
    rows.append({"run": str(tmp_path), "file": "model.glb", "assimp": {"meshes": 1, "vertices": 24, "faces": 12},
                 "blender": {"mesh_objects": 1, "raw": [{"vertices": 24, "faces": 12}], "merged": [merged]}})
    lines = client_checks.format_rows(rows).splitlines()
    assert lines[2].split()[1:] == ["model.obj"] + ["-"] * 9
    assert lines[3].split()[1:] == ["model.glb", "1", "24", "12", "8", "1", "0", "0", "7/10/2", "1/24/12"]
    assert client_checks.main([str(tmp_path / "nothing")]) == 2


def test_visibility_speed_times_both_kinds_of_rays(capsys):
    from bench import visibility_speed

    assert visibility_speed.main(["--grids", "24"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[:2] for r in rows] == [["24", "parallel"], ["24", "cameras"]]
    assert int(rows[1][3]) > 0  # the dent under the base: flat rays to the lowest cameras do not reach it
