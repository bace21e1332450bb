"""The primitives prior's vocabulary, canonical shapes and render libraries.

A prompt of the vocabulary is "<article> <color> <shape>[, <view> view]", e.g.
"a red cube" or "an orange torus, side view". The canonical shapes (centred at the
origin, +z up, the training frame) are exposed as trimesh meshes for evaluation.

The prior tells elevation bands apart: a front, side or back camera under VIEW_BANDS[0] degrees
gets "low front", "low side" or "low back", one at VIEW_BANDS[1] degrees or more "high front" and
so on (`renderers.view_words.banded_view_word`). By the text alone, within one view word a shape seen
from one elevation passes for a distorted one seen from another: a cone with a skirt below its
base, seen from 0 degrees, is nearer the true cone seen from 12 degrees than from 0, and cubes,
cylinders and cones grow taller, their flat bases sinking, when "front" spans 5 to 60 degrees.
So the prior also weighs its renders by their cameras' elevations (`render_elevations`, and the
kernel in `guidance.primitives`).

A library holds, per shape and view word, K renders of the shape from cameras drawn
from the stages' own camera distribution, Lambertian-shaded under the camera's sampled
light plus ambient, on a white background. The color is applied afterwards: each
render is stored as coverage `alpha` and coverage-weighted shading `alpha_shade`, so that
image = 1 - alpha + alpha_shade * color (in [0, 1]) for any color of the vocabulary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from torch import Tensor

from renderers import raster
from renderers.cameras import CameraConfig, sample_cameras, to_clip
from renderers.shading import lambert
from renderers.view_words import banded_view_word, view_words_of

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.12, 0.65, 0.18),
    "blue": (0.10, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "purple": (0.50, 0.15, 0.70),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "pink": (0.95, 0.45, 0.70),
    "brown": (0.50, 0.30, 0.12),
}
COLOR_ALIASES = {"grey": "gray", "violet": "purple"}
SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "capsule")
SHAPE_ALIASES = {"ball": "sphere", "box": "cube", "donut": "torus", "ring": "torus", "pill": "capsule"}
PRIOR_AMBIENT = 0.3  # ambient share of the libraries' Lambertian shading (the stages render with the same)
_LIBRARY_FORMAT = 1  # bump when the render code changes, to invalidate caches


class UnknownPromptError(ValueError):
    """A prompt the primitives prior cannot read; the message lists the vocabulary."""


# Degrees: front, side and back views from under the first are "low" views, from the second up (to
# overhead's 60) "high" views.
VIEW_BANDS = (0.0, 20.0)
PRIOR_VIEW_WORDS = view_words_of(VIEW_BANDS)  # front, side, back, overhead, low front, ..., high front, ...


def vocabulary_text() -> str:
    return (
        f"shapes: {', '.join(SHAPES)}; colors: {', '.join(COLORS)}; "
        f"prompts look like 'a red cube' or 'a blue torus' (an optional ', front view', ', side view', "
        f"', back view', ', overhead view', ', low front view', ', high side view' and the like may follow)"
    )


def prompts() -> list[str]:
    """Every prompt of the vocabulary, e.g. 'a red sphere', in a fixed order."""
    return [prompt_text(color, shape) for shape in SHAPES for color in COLORS]


def prompt_text(color: str, shape: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}"


_VIEW_RE = re.compile(r",?\s*\b((?:low |high )?(?:front|side|back)|overhead)\s+view\s*$")


def parse_prompt(text: str) -> tuple[str | None, str | None, str | None]:
    """'a red cube, side view' -> ('red', 'cube', 'side'); ', low front view' or '' -> (None, None, 'low front' | None).

    Raises UnknownPromptError, listing the vocabulary, for anything else.
    """
    if not isinstance(text, str):
        raise UnknownPromptError(f"prompt must be a string, got {type(text).__name__}")
    s = text.strip().lower()
    view = None
    match = _VIEW_RE.search(s)
    if match:
        view = match.group(1)
        s = s[: match.start()]
    s = s.strip(" ,.")
    if not s:
        return None, None, view  # the unconditional prompt (for classifier-free guidance)
    words = s.split()
    if words and words[0] in ("a", "an", "the", "one"):
        words = words[1:]
    if len(words) == 2:
        color = COLOR_ALIASES.get(words[0], words[0])
        shape = SHAPE_ALIASES.get(words[1], words[1])
        if color in COLORS and shape in SHAPES:
            return color, shape, view
    raise UnknownPromptError(
        f"the primitives prior does not know the prompt {text!r}. Its vocabulary is one color and one shape: "
        f"{vocabulary_text()}. For free-form prompts use a Stable Diffusion guidance model."
    )


def primitive_mesh(shape: str) -> trimesh.Trimesh:
    """The canonical mesh of `shape` in the training frame (+z up, centred at the origin)."""
    if shape == "sphere":
        return trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    if shape == "cube":
        return trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    if shape == "cylinder":
        return trimesh.creation.cylinder(radius=0.4, height=0.8, sections=96)
    if shape == "cone":
        mesh = trimesh.creation.cone(radius=0.45, height=0.9, sections=96)
        mesh.apply_translation((0.0, 0.0, -0.45))  # base at z = -0.45, apex at z = +0.45
        return mesh
    if shape == "torus":
        return trimesh.creation.torus(major_radius=0.4, minor_radius=0.15, major_sections=96, minor_sections=32)
    if shape == "capsule":
        # trimesh's height is the distance between the two hemisphere centres.
        return trimesh.creation.capsule(height=1.0 - 2 * 0.3, radius=0.3, count=(48, 48))
    raise UnknownPromptError(f"unknown shape {shape!r}; {vocabulary_text()}")


@dataclass
class LibraryConfig:
    resolution: int = 64  # side of the library images, px (the prior's resolution)
    renders_per_view: int = 96  # K: renders per shape and view word
    flat_share: float = 0.0  # share of each view word's renders left unshaded (albedo only: alpha_shade = alpha)
    ambient: float = PRIOR_AMBIENT  # ambient share of the Lambertian shading, as in the renderers
    supersample: int = 2  # renders at this many times the resolution, then averages (antialiasing)
    seed: int = 0  # seed of the camera draws
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)  # the stages' camera distribution

    def check(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if self.renders_per_view < 1:
            raise ValueError(f"renders_per_view must be >= 1, got {self.renders_per_view}")
        if not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"ambient must be in [0, 1], got {self.ambient}")
        if not 0.0 <= self.flat_share <= 1.0:
            raise ValueError(f"flat_share must be in [0, 1], got {self.flat_share}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        self.camera.check()

    def key(self) -> str:
        """A digest of everything that changes the library, for the cache file name."""
        fields = dataclasses.asdict(dataclasses.replace(self, camera=self.camera.filled()))
        if not fields["flat_share"]:
            del fields["flat_share"]  # the libraries built before the setting existed stay valid
        payload = json.dumps({"format": _LIBRARY_FORMAT, "shapes": SHAPES, "views": PRIOR_VIEW_WORDS,
                              "view_bands": VIEW_BANDS, **fields}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """The user cache folder of DreamLift: $DREAMLIFT_CACHE, else $XDG_CACHE_HOME/dreamlift, else ~/.cache/dreamlift."""
    if os.environ.get("DREAMLIFT_CACHE"):
        return Path(os.environ["DREAMLIFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dreamlift"


def render_shape(
    mesh: trimesh.Trimesh,
    mvp: Tensor,  # [B, 4, 4]
    light_position: Tensor,  # [B, 3]
    resolution: int,
    ambient: float,
    supersample: int,
) -> tuple[Tensor, Tensor]:
    """Coverage and coverage-weighted Lambertian shading of a mesh: ([B, R, R], [B, R, R])."""
    smooth = mesh.smooth_shaded  # splits vertices at sharp edges, smooth normals elsewhere
    verts = torch.tensor(np.array(smooth.vertices), dtype=torch.float32)
    normals = torch.tensor(np.array(smooth.vertex_normals), dtype=torch.float32)
    tri = torch.tensor(np.array(smooth.faces), dtype=torch.int64)
    size = resolution * supersample
    pos_clip = to_clip(verts, mvp)  # [B, V, 4]
    rast = raster.rasterize(pos_clip, tri, (size, size))
    attrs = torch.cat([verts, normals], dim=-1).expand(mvp.shape[0], -1, -1).contiguous()
    interp = raster.interpolate(attrs, rast, tri)  # [B, S, S, 6]
    points, n = interp[..., :3], torch.nn.functional.normalize(interp[..., 3:], dim=-1)
    light_dir = torch.nn.functional.normalize(light_position[:, None, None, :] - points, dim=-1)
    shade = lambert(n, light_dir, ambient)[..., 0]  # [B, S, S]
    alpha = (rast[..., 3] > 0).float()
    pooled = torch.nn.functional.avg_pool2d(torch.stack([alpha, alpha * shade], dim=1), supersample)
    return pooled[:, 0], pooled[:, 1]


def _draw_cameras_per_view(config: LibraryConfig) -> dict[str, list]:
    """Draw cameras from the stages' distribution until every view word has K of them."""
    generator = torch.Generator().manual_seed(config.seed)
    k = config.renders_per_view
    chosen: dict[str, list[tuple[Tensor, Tensor]]] = {v: [] for v in PRIOR_VIEW_WORDS}
    for _ in range(1000):
        cams = sample_cameras(512, config.camera, (config.resolution, config.resolution), generator=generator)
        for i, base in enumerate(cams.view_words):
            word = banded_view_word(base, float(cams.elevation[i]), VIEW_BANDS)
            if len(chosen[word]) < k:
                chosen[word].append((cams.mvp[i], cams.light_position[i], float(cams.elevation[i])))
        if all(len(c) == k for c in chosen.values()):
            return chosen
    for word in [v for v, c in chosen.items() if len(c) < k and v != "overhead"]:
        base = word.split()[-1]
        family = [w for w in (base, f"high {base}", f"low {base}") if len(chosen[w]) == k]
        if family:  # cameras that never reach this word's band: the stages never ask for it either
            chosen[word] = list(chosen[family[0]])
    missing = [v for v, c in chosen.items() if len(c) < k]
    if not missing:
        return chosen
    raise ValueError(
        f"the camera distribution never produces the view words {missing} "
        f"(elevation_range={config.camera.elevation_range}, azimuth_range={config.camera.azimuth_range})"
    )


def render_elevations(config: LibraryConfig) -> Tensor:
    """The elevation (degrees, before jitter) of every render of the library for `config`: [V, K], V in
    PRIOR_VIEW_WORDS order. The camera draw is seeded, so the cache need not store them."""
    config.check()
    cameras = _draw_cameras_per_view(config)
    return torch.tensor([[c[2] for c in cameras[word]] for word in PRIOR_VIEW_WORDS], dtype=torch.float64)


def build_library(config: LibraryConfig, batch: int = 48) -> dict[str, Tensor]:
    """Render the library: {'alpha', 'alpha_shade'}: [S, V, K, R, R] float16, S shapes, the V = 10 PRIOR_VIEW_WORDS.
    The last round(flat_share * K) renders of each view word are unshaded (ambient 1): the stages'
    albedo-only renders have their like in the library."""
    config.check()
    cameras = _draw_cameras_per_view(config)
    r, k = config.resolution, config.renders_per_view
    shaded = k - round(config.flat_share * k)
    alpha = torch.zeros(len(SHAPES), len(PRIOR_VIEW_WORDS), k, r, r, dtype=torch.float16)
    alpha_shade = torch.zeros_like(alpha)
    for s, shape in enumerate(SHAPES):
        mesh = primitive_mesh(shape)
        for v, word in enumerate(PRIOR_VIEW_WORDS):
            mvp = torch.stack([c[0] for c in cameras[word]])
            light = torch.stack([c[1] for c in cameras[word]])
            for first, last, ambient in ((0, shaded, config.ambient), (shaded, k, 1.0)):
                for start in range(first, last, batch):
                    end = min(start + batch, last)
                    a, a_s = render_shape(mesh, mvp[start:end], light[start:end], r, ambient, config.supersample)
                    alpha[s, v, start:end] = a.half()
                    alpha_shade[s, v, start:end] = a_s.half()
    return {"alpha": alpha, "alpha_shade": alpha_shade}


def load_library(config: LibraryConfig, cache: Path | None = None, log=print) -> dict[str, Tensor]:
    """The library for `config`, from the disk cache, or rendered and cached (written atomically)."""
    folder = cache_dir() / "primitives" if cache is None else Path(cache)
    path = folder / f"library-{config.key()}.pt"
    if path.exists():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            expected = (len(SHAPES), len(PRIOR_VIEW_WORDS), config.renders_per_view, config.resolution, config.resolution)
            if tuple(data["alpha"].shape) == expected:
                return data
        except Exception as exc:  # a truncated or foreign file: rebuild it
            log(f"primitives prior: cache {path} unreadable ({exc}); rebuilding")
    renders = len(SHAPES) * len(PRIOR_VIEW_WORDS) * config.renders_per_view
    log(f"primitives prior: rendering a library of {renders} images at {config.resolution} px (once per machine; "
        f"cached in {folder}) ...")
    start = time.perf_counter()
    data = build_library(config)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)
    log(f"primitives prior: built library in {time.perf_counter() - start:.1f} s -> {path}")
    return data
