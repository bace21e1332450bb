"""examples/build.py: the ready-made results of the app's examples, made by the pipeline and kept small."""
import json
import subprocess

import numpy as np
from PIL import Image

from examples import build, ready
from helpers import tiny_run_config


def test_build_keeps_a_small_result_per_prompt_from_its_run_and_rebuilds_from_scratch(tmp_path):
    root = tmp_path / "results"
    (root / "stale").mkdir(parents=True)  # a result of an earlier build: gone after a rebuild
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()  # the code run
    build.build(["a red cube"], root, tiny_run_config())
    folder = root / "a-red-cube"
    assert sorted(p.name for p in root.iterdir()) == ["a-red-cube"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.glb", "preview.png", "turntable.mp4", "strip.png", "facts.json"} <= names <= \
        {"model.glb", "model.zip", "preview.png", "turntable.mp4", "strip.png", "facts.json"}
    assert sum(p.stat().st_size for p in folder.iterdir()) <= build.MAX_EXAMPLE_BYTES
    assert (folder / "model.glb").read_bytes()[:4] == b"glTF"
    facts = json.loads((folder / "facts.json").read_text())
    assert (facts["prompt"], facts["preset"], facts["seed"], facts["guidance"]) == ("a red cube", "quick", 0, "primitives")
    assert facts["commit"] == head and 0 < facts["seconds"] and abs(facts["minutes"] - facts["seconds"] / 60) < 0.06
    assert set(facts["stage_seconds"]) == {"coarse", "refine", "export"}
    strip = np.asarray(Image.open(folder / "strip.png"))
    frame = build.read_frames(folder / "turntable.mp4")[0]
    assert strip.shape[0] == frame.shape[0] and strip.shape[1] == build.STRIP_FRAMES * frame.shape[1]
    assert (strip < 200).any()  # the object is in the frames, not only the background
    found = ready.load("a red cube", "primitives", root)
    assert found["glb"] == str(folder / "model.glb") and found["facts"] == facts
    assert ready.load("a red cube", "stable-diffusion", root) is None  # made with another model
    assert ready.load("a blue torus", "primitives", root) is None

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{build.GALLERY_START}\nold\n{build.GALLERY_END}\nrest\n")
    build.write_gallery(["a red cube", "a blue torus"], root, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{build.GALLERY_END}\nrest\n") and "old" not in text
    assert "](results/a-red-cube/strip.png)" in text and '"a red cube"' in text and "torus" not in text
    assert f"{facts['minutes']} min on cpu" in text


def test_shrunk_turntables_keep_the_orbit_in_fewer_smaller_frames():
    frames = [np.full((64, 64, 3), i, np.uint8) for i in range(48)]
    small = build.shrink_frames(frames, 12, 32)
    assert len(small) == 12 and small[0].shape == (32, 32, 3)
    assert [int(f[0, 0, 0]) for f in small] == list(range(0, 48, 4))
