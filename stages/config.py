"""The whole run's configuration: one dataclass per stage, named presets, and `--set` overrides.

Presets are named instances of `Config`:
- `quick`: CPU-sized (low resolution, few steps); the primitives prior finishes in minutes.
- `standard`: one GPU, Magic3D-like: a 64 px coarse NeRF, then a 512 px DMTet refine.
- `high`: longer and finer than `standard`.
The guidance model is chosen separately ("auto" = Stable Diffusion on a CUDA GPU, else the
offline primitives prior); `stages.plan.resolve` adapts what depends on it (`guidance.registry`).
"""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass

from geometry.nerf import FieldConfig
from guidance import registry
from guidance.sds import SDSConfig
from renderers.cameras import CameraConfig
from renderers.volume import VolumeConfig
from stages.coarse import CoarseConfig
from stages.export import ExportConfig
from stages.refine import RefineConfig

PRESETS = ("quick", "standard", "high")
STAGES = ("coarse", "refine", "export")
MAX_SEED = 2**32 - 1


@dataclass
class Config:
    preset: str = "quick"  # the preset this config started from (recorded in run.json)
    guidance: str = "auto"  # "auto" (Stable Diffusion on CUDA, else primitives) or a name of `guidance.registry`
    model_id: str | None = None  # hub id or local folder of the guidance model; None = the model's default
    seed: int = 0  # the run's seed; the pipeline copies it into coarse.seed and refine.seed
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    stop_after: str = "export"  # last stage to train: "coarse" exports the coarse field's mesh, "refine" or "export" do all
    prior_resolution: int = 64  # primitives prior: image side of its libraries, px
    prior_renders_per_view: int = 96  # primitives prior: renders per shape and view word
    prior_flat_share: float = 0.0  # primitives prior: share of those renders left unshaded (albedo only)
    prior_elevation_sigma: float | None = None  # primitives prior: its camera-elevation kernel's width, degrees; None = automatic (0.5 at 96 renders); 0 = the text alone
    prior_background: float = 1.0  # primitives prior: grey level behind its objects (set from the prompt by the spec's adapt)
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)  # training camera distribution
    coarse: CoarseConfig = dataclasses.field(default_factory=CoarseConfig)  # stage 1: NeRF + SDS
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)  # stage 2: DMTet + SDS
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)  # stage 3: files

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.guidance not in registry.choices():
            raise ValueError(f"guidance must be one of {list(registry.choices())}, got {self.guidance!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.stop_after not in STAGES:
            raise ValueError(f"stop_after must be one of {list(STAGES)}, got {self.stop_after!r}")
        if not isinstance(self.prior_resolution, int) or not 16 <= self.prior_resolution <= 256:
            raise ValueError(f"prior_resolution must be an integer in [16, 256], got {self.prior_resolution!r}")
        if not isinstance(self.prior_renders_per_view, int) or not 1 <= self.prior_renders_per_view <= 1024:
            raise ValueError(f"prior_renders_per_view must be an integer in [1, 1024], got {self.prior_renders_per_view!r}")
        if isinstance(self.prior_flat_share, bool) or not isinstance(self.prior_flat_share, (int, float)) \
                or not 0.0 <= self.prior_flat_share <= 1.0:
            raise ValueError(f"prior_flat_share must be a share in [0, 1], got {self.prior_flat_share!r}")
        if self.prior_elevation_sigma is not None and (
                isinstance(self.prior_elevation_sigma, bool) or not isinstance(self.prior_elevation_sigma, (int, float))
                or not 0.0 <= self.prior_elevation_sigma <= 90.0):
            raise ValueError(f"prior_elevation_sigma must be a number of degrees in [0, 90], got {self.prior_elevation_sigma!r}")
        if not isinstance(self.prior_background, (int, float)) or not 0.0 <= self.prior_background <= 1.0:
            raise ValueError(f"prior_background must be a grey level in [0, 1], got {self.prior_background!r}")
        self.camera.check()
        self.coarse.check()
        self.refine.check()
        self.export.check()


def _quick() -> Config:
    return Config(
        preset="quick",
        coarse=CoarseConfig(
            iters=500, batch_size=1, resolution=64, albedo_warmup=100, prob_albedo=0.2, prob_lambertian=0.8,
            prob_textureless=0.0, lambda_entropy=1e-2, preview_every=0, preview_resolution=256,
            field=FieldConfig(num_levels=8, log2_table_size=15, max_resolution=256, hidden_dim=32, num_layers=1),
            volume=VolumeConfig(num_samples=32, occupancy_threshold=1.0, occupancy_warmup_steps=64),
            sds=SDSConfig(t_anneal="linear", t_max_end=0.5),
        ),
        refine=RefineConfig(
            iters=300, batch_size=1, resolution=64, grid_resolution=48, lr_sdf=5e-2, preview_every=100,
            preview_resolution=256, model_every=100,
        ),
        export=ExportConfig(texture_size=512, target_faces=20_000, turntable_resolution=256, turntable_frames=48),
    )


def _standard() -> Config:
    return Config(
        preset="standard",
        coarse=CoarseConfig(
            iters=5000, batch_size=1, resolution=64, albedo_warmup=1000, preview_every=250, preview_resolution=256,
            field=FieldConfig(), volume=VolumeConfig(num_samples=64), sds=SDSConfig(t_anneal="linear", t_max_end=0.5),
        ),
        refine=RefineConfig(iters=3000, batch_size=4, resolution=512, grid_resolution=128, preview_every=250),
        export=ExportConfig(texture_size=1024, target_faces=60_000, turntable_resolution=512, turntable_frames=72),
    )


def _high() -> Config:
    config = _standard()
    config.preset = "high"
    config.coarse.iters = 10000
    config.coarse.volume.num_samples = 96
    config.refine.iters = 5000
    config.refine.grid_resolution = 192
    config.export.texture_size = 2048
    config.export.target_faces = 100_000
    return config


def preset(name: str) -> Config:
    """A fresh Config for the named preset (raises ValueError listing the presets)."""
    if name == "quick":
        return _quick()
    if name == "standard":
        return _standard()
    if name == "high":
        return _high()
    raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")


# ---- overrides: "coarse.iters=300", "refine.sds.t_max=0.4" ------------------------------------
def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Set fields from 'dotted.key=value' strings; the value is parsed to the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like 'coarse.iters=300', got {item!r}")
        key, raw = item.split("=", 1)
        set_field(config, key.strip(), raw.strip())
    config.check()
    return config


def set_field(config, key: str, raw: str) -> None:
    target, parts = config, key.split(".")
    for i, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        if name not in names:
            where = ".".join(parts[:i]) or "the config"
            raise ValueError(f"unknown setting {key!r}: {where} has no field {name!r} (fields: {', '.join(names)})")
        if i == len(parts) - 1:
            current = getattr(target, name)
            if dataclasses.is_dataclass(current):
                raise ValueError(f"setting {key!r} is a group; set one of its fields, e.g. {key}.{dataclasses.fields(current)[0].name}=...")
            annotation = str(next(f.type for f in dataclasses.fields(target) if f.name == name))
            setattr(target, name, parse_value(key, raw, current, text=annotation.replace(" ", "")))
        else:
            target = getattr(target, name)


def parse_value(key: str, raw: str, current, text: str = ""):
    """Parse `raw` to the type of the field's current value. A field annotated `str | None`
    takes the text as it is, without Python quotes, and "none" for None. A field annotated `float`
    or `float | None` takes a float even where its current value is an int (an earlier "=0"); one
    annotated `bool | None` takes a yes/no word or "none"."""
    if text == "bool|None":
        if raw.lower() == "none":
            return None
        current = False  # parsed below as a yes/no word
    if text == "str|None":
        return None if raw.lower() == "none" else raw
    if text == "float|None" and raw.lower() == "none":
        return None
    if text in ("float", "float|None"):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"setting {key!r} expects float, got {raw!r}") from None
    if "tuple" in text and raw.strip()[:1] in ("(", "["):  # `str | tuple` fields (backgrounds) given a colour
        current = ()
    try:
        if isinstance(current, bool):
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, str):
            return raw
        if raw.lower() == "none":
            return None
        value = ast.literal_eval(raw)
        if isinstance(current, tuple):
            value = tuple(value)
        return value
    except (ValueError, SyntaxError, TypeError):
        kind = type(current).__name__ if current is not None else "a Python literal"
        raise ValueError(f"setting {key!r} expects {kind}, got {raw!r}") from None


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (run.json), ignoring unknown keys."""
    config = Config()
    _fill(config, data)
    return config


def _fill(target, data: dict) -> None:
    for f in dataclasses.fields(target):
        if f.name not in data:
            continue
        current, value = getattr(target, f.name), data[f.name]
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _fill(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            setattr(target, f.name, tuple(value))
        else:
            setattr(target, f.name, value)
