"""Loading from a hub: a local stand-in of the Hugging Face hub's file API (tests/hub_standin.py)
serves a tiny Stable Diffusion pipeline that, like many community repositories, has no fp16
variant files. Each load runs in a fresh interpreter, since huggingface_hub reads HF_ENDPOINT,
HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hub_standin import COMMIT, HubStandIn
from tiny_pipelines import save_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
LOAD = """
import json, sys, torch
from guidance import GuidanceLoadError, load
for model_id in sys.argv[1:]:
    try:
        g = load("stable-diffusion", device="cpu", model_id=model_id, dtype=torch.float16)
        print(json.dumps({"id": model_id, "dtype": str(g.unet.dtype), "resolution": g.resolution, "revision": g.revision}))
    except GuidanceLoadError as exc:
        print(json.dumps({"id": model_id, "error": str(exc)}))
"""


def _run(code_or_args: list[str], env: dict) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # offline only where a test says
    full_env.update(HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    repo = save_tiny_sd(tmp_path_factory.mktemp("repo"))
    with HubStandIn({"community/tiny-sd": repo}) as stand_in:
        yield stand_in


@pytest.mark.slow
def test_a_repository_without_fp16_files_loads_its_plain_weights_online_then_offline(hub, tmp_path):
    cache = str(tmp_path / "hf-cache")
    result = _run(["-c", LOAD, "community/tiny-sd", "nobody/no-such-model"], {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": cache})
    assert result.returncode == 0, result.stderr
    loaded, missing = [json.loads(line) for line in result.stdout.splitlines()]
    # The fp16 file is a 404 for that file, not for the repository: the plain weights are used, in fp16.
    # run.json's model revision: the commit the hub served (the stand-in's one revision).
    assert loaded == {"id": "community/tiny-sd", "dtype": "torch.float16", "resolution": 16, "revision": COMMIT}, loaded
    asked = {(path.split("/resolve/")[-1].split("/", 1)[-1], status) for _, path, status in hub.requests}
    assert ("unet/diffusion_pytorch_model.fp16.safetensors", 404) in asked
    assert ("unet/diffusion_pytorch_model.safetensors", 200) in asked
    # A repository that does not exist is still reported as such.
    assert "nobody/no-such-model" in missing["error"] and "no such repository" in missing["error"]

    # Offline, the cache the first load filled (plain files only) is enough.
    seen = len(hub.requests)
    result = _run(["-c", LOAD, "community/tiny-sd"], {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["dtype"] == "torch.float16", result.stdout
    assert len(hub.requests) == seen  # nothing was asked of the hub


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_with_one_clean_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = _run(["generate.py", "a red cube", "--guidance", "stable-diffusion", "--model-id", "someone/some-model",
                   "--out", str(tmp_path / "run")], {"HF_ENDPOINT": closed, "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # no warnings, no "Retrying in 1s" lines, no traceback
    assert lines[0].startswith("error: could not load the Stable Diffusion guidance model 'someone/some-model'")
    assert "could not be reached" in lines[0]
