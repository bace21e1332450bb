"""The whole run's configuration: one dataclass per stage, named presets, and `--set` overrides.

Presets are named instances of `Config`:
- `quick`: CPU-sized (low resolution, few steps); the primitives prior finishes in minutes.
- `fast`: one GPU for a minute or two (a ZeroGPU Space's default): `standard`'s sizes cut down
  along `stages.gpu_cost`'s model so that a Stable Diffusion run fits an anonymous visitor's quota.
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
from guidance.hub import MODEL_DTYPES
from guidance.prior_config import FLAT_KEYS as PRIOR_FLAT_KEYS
from guidance.prior_config import PriorConfig
from guidance.sds import SDSConfig
from renderers.cameras import CameraConfig
from renderers.volume import VolumeConfig
from stages.coarse import CoarseConfig
from stages.export import ExportConfig
from stages.refine import RefineConfig

PRESETS = ("quick", "fast", "standard", "high")
STAGES = ("coarse", "refine", "export")
MAX_SEED = 2**32 - 1


@dataclass
class Config:
    preset: str = "quick"  # the preset this config started from (recorded in run.json)
    guidance: str = "auto"  # "auto" (Stable Diffusion on CUDA, else primitives) or a name of `guidance.registry`
    model_id: str | None = None  # hub id or local folder of the guidance model; None = the model's default
    model_dtype: str = "auto"  # precision of a hub guidance model: "auto" (fp16 on CUDA, fp32 elsewhere), "fp16", "bf16", "fp32"
    seed: int = 0  # the run's seed; the pipeline copies it into coarse.seed and refine.seed
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    stop_after: str = "export"  # last stage to train: "coarse" exports the coarse field's mesh, "refine" or "export" do all
    prior: PriorConfig = dataclasses.field(default_factory=PriorConfig)  # the primitives prior's libraries
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
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {list(MODEL_DTYPES)}, got {self.model_dtype!r}")
        if self.stop_after not in STAGES:
            raise ValueError(f"stop_after must be one of {list(STAGES)}, got {self.stop_after!r}")
        self.prior.check()
        self.camera.check()
        self.coarse.check()
        self.refine.check()
        self.export.check()

    def filled(self) -> Config:
        """A copy whose unset (None) settings hold the values a run takes when its guidance model chose none."""
        camera, refine = self.camera.filled(), self.refine.filled()
        if refine.light_jitter is None:  # the refine stage's light follows the cameras' unless set
            refine = dataclasses.replace(refine, light_jitter=camera.light_jitter)
        return dataclasses.replace(self, camera=camera, coarse=self.coarse.filled(), refine=refine)


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


def _fast() -> Config:
    return Config(
        preset="fast",
        coarse=CoarseConfig(
            iters=400, batch_size=1, resolution=64, albedo_warmup=80, preview_every=100, preview_resolution=128,
            field=FieldConfig(), volume=VolumeConfig(num_samples=48), sds=SDSConfig(t_anneal="linear", t_max_end=0.5),
        ),
        refine=RefineConfig(iters=200, batch_size=1, resolution=256, grid_resolution=64, preview_every=50),
        export=ExportConfig(texture_size=1024, target_faces=40_000, turntable_resolution=384, turntable_frames=48),
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
    if name == "fast":
        return _fast()
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
    if key.startswith("prior_") and key.removeprefix("prior_") in PRIOR_FLAT_KEYS:
        raise ValueError(f"unknown setting {key!r}: the primitives prior's settings are a group now, "
                         f"set prior.{key.removeprefix('prior_')}=...")
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
    """Parse `raw` to the type of the field: its annotation `text` (spaces removed) where that names
    one, else its current value's. A field annotated `... | None` takes "none" for None (an unset
    field's current value is None: its type comes from the annotation). `str` fields take the text
    as it is, without Python quotes; `float` ones a float even where the current value is an int
    (an earlier "=0"); `str | tuple` fields (backgrounds) a colour in brackets."""
    if text.endswith("|None") and raw.lower() == "none":
        return None
    kind = text.removesuffix("|None")
    if kind == "str":
        return raw
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"setting {key!r} expects float, got {raw!r}") from None
    if kind in ("bool", "int"):
        current = False if kind == "bool" else 0
    elif kind.startswith("tuple") or ("tuple" in kind and raw.strip()[:1] in ("(", "[")):
        current = ()
    elif "str" in kind.split("|"):  # a background's mode by name
        current = ""
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
        if raw.lower() == "none" and current is None:
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
    """Rebuild a Config from `to_dict` output (run.json), ignoring unknown keys; reads the flat
    `prior_<key>` settings of run.json files written before `Config.prior`."""
    flat = {key: data[f"prior_{key}"] for key in PRIOR_FLAT_KEYS if f"prior_{key}" in data}
    if flat:
        data = {**data, "prior": {**flat, **data.get("prior", {})}}
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
        elif isinstance(value, list) and (isinstance(current, tuple) or "tuple" in str(f.type)):
            setattr(target, f.name, tuple(value))
        else:
            setattr(target, f.name, value)
