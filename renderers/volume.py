"""NeRF volume rendering: stratified ray marching in the bounding sphere, shading, compositing.

A ray r(t) = o + t d (unit d) is clipped to the bounding sphere, sampled at `num_samples`
stratified distances in [near, far] (jittered by `generator`, bin midpoints without one),
and composited with alpha_i = 1 - exp(-sigma_i delta_i), T_i = prod_{j<i} (1 - alpha_j)
(computed as exp(-sum_{j<i} sigma_j delta_j), the same product), w_i = T_i alpha_i.

Shading (DreamFusion): "albedo" shows the albedo; "lambertian" multiplies it by
ambient + (1 - ambient) max(0, n . l), l the unit vector from the sample to the camera's
point light; "textureless" is Lambertian on white. Normals come from the field
(-grad sigma, differentiable while gradients are enabled).

The field is anything with `field(x) -> (sigma [N], albedo [N, 3])`,
`field.forward_with_normal(x, create_graph) -> (sigma, albedo, normal [N, 3])` and
`field.density(x) -> [N]` (see geometry.nerf.NeRFField).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.cameras import Cameras, get_rays
from renderers.ray_march import intersect_sphere, march_rays
from renderers.shading import SHADINGS

# DreamFusion's shading mix after an albedo-only warm-up (threestudio's reproduction of the paper:
# shaded with probability 0.75, of which half textureless; ambient 0.1, diffuse 0.9).
DREAMFUSION_SHADING = {"albedo": 0.25, "lambertian": 0.375, "textureless": 0.375}
DREAMFUSION_AMBIENT = 0.1


@dataclass
class VolumeConfig:
    num_samples: int = 64  # stratified samples per ray inside the bounding sphere
    bound: float = 1.0  # radius of the bounding sphere, world units
    near_min: float = 0.05  # no sample closer to the camera than this, world units
    chunk_size: int = 0  # rays per chunk (0 = all rays at once): the memory knob
    ambient: float | None = None  # ambient share of Lambertian shading, in [0, 1]; None = the guidance model's, else DREAMFUSION_AMBIENT
    use_occupancy: bool = True  # whether the caller keeps an OccupancyGrid to skip empty samples
    occupancy_resolution: int = 32  # occupancy cells per axis over [-bound, bound]^3
    occupancy_threshold: float = 0.01  # density (1 / world unit) below which a cell may be empty
    occupancy_decay: float = 0.95  # per-update decay of the running max density of a cell
    occupancy_update_every: int = 16  # training steps between occupancy updates
    occupancy_warmup_steps: int = 128  # steps before any cell may be marked empty

    def check(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.bound <= 0:
            raise ValueError(f"bound must be > 0, got {self.bound}")
        if self.near_min < 0:
            raise ValueError(f"near_min must be >= 0, got {self.near_min}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {self.chunk_size}")
        if self.ambient is not None and not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"ambient must lie in [0, 1], got {self.ambient}")
        if self.occupancy_resolution < 1:
            raise ValueError(f"occupancy_resolution must be >= 1, got {self.occupancy_resolution}")
        if not 0.0 < self.occupancy_decay <= 1.0:
            raise ValueError(f"occupancy_decay must lie in (0, 1], got {self.occupancy_decay}")
        if self.occupancy_update_every < 1:
            raise ValueError(f"occupancy_update_every must be >= 1, got {self.occupancy_update_every}")


class OccupancyGrid:
    """Coarse grid over [-bound, bound]^3 of which cells may hold density; samples elsewhere are skipped.

    Each update queries the field (no grad) at one jittered point per cell and keeps a decaying
    running max. A cell is occupied when that reaches min(threshold, mean over cells), then
    occupancy is dilated by one cell (conservative: a surface between probes is not lost).
    It starts all occupied and marks nothing empty before `warmup_steps`.
    """

    def __init__(
        self,
        resolution: int = 32,  # cells per axis
        bound: float = 1.0,  # half side of the covered cube, world units
        threshold: float = 0.01,  # density threshold, 1 / world unit
        decay: float = 0.95,  # per-update decay of the running max
        update_every: int = 16,  # steps between updates in `step`
        warmup_steps: int = 128,  # steps before `step` may mark cells empty
        device: torch.device | str | None = None,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.resolution, self.bound, self.threshold, self.decay = resolution, float(bound), threshold, decay
        self.update_every, self.warmup_steps = update_every, warmup_steps
        self.density = torch.zeros(resolution, resolution, resolution, device=device)  # [R, R, R] running max
        self.occupied = torch.ones(resolution, resolution, resolution, dtype=torch.bool, device=device)  # [R, R, R]
        self.num_updates = 0

    @classmethod
    def from_config(cls, config: VolumeConfig, device: torch.device | str | None = None) -> "OccupancyGrid":
        return cls(
            config.occupancy_resolution, config.bound, config.occupancy_threshold, config.occupancy_decay,
            config.occupancy_update_every, config.occupancy_warmup_steps, device,
        )

    @property
    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

    def cell_points(self, generator: torch.Generator | None = None) -> Tensor:  # -> [R^3, 3] world points
        """One point per cell, (ix, iy, iz) order: the centre, or uniformly jittered in the cell."""
        r, device = self.resolution, self.density.device
        idx = torch.arange(r, device=device, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), dim=-1).reshape(-1, 3)  # [R^3, 3]
        if generator is None:
            offset = torch.full_like(grid, 0.5)
        else:
            offset = torch.rand(grid.shape, generator=generator, device=generator.device).to(device)
        return (grid + offset) / r * (2.0 * self.bound) - self.bound

    @torch.no_grad()
    def update(self, field, generator: torch.Generator | None = None, refresh: bool = True, chunk_size: int = 65536) -> None:
        """Query the field once per cell; with refresh=True also recompute which cells are occupied."""
        points = self.cell_points(generator)
        sigma = torch.cat([field.density(points[i : i + chunk_size]) for i in range(0, points.shape[0], chunk_size)])
        sigma = sigma.reshape(self.density.shape).to(self.density.dtype)
        self.density = torch.maximum(self.density * self.decay, sigma)
        self.num_updates += 1
        if refresh:
            threshold = min(self.threshold, float(self.density.mean()))
            # >= so that a constant field (all cells equal to the mean) stays occupied.
            occupied = (self.density >= threshold).float()[None, None]
            self.occupied = F.max_pool3d(occupied, kernel_size=3, stride=1, padding=1)[0, 0] > 0.5

    def step(self, field, step: int, generator: torch.Generator | None = None) -> bool:
        """The training-loop hook: update every `update_every` steps, never marking empty cells
        before `warmup_steps`. Returns whether it updated."""
        if step % self.update_every != 0:
            return False
        self.update(field, generator, refresh=step >= self.warmup_steps)
        return True

    def lookup(self, x: Tensor) -> Tensor:  # x: [N, 3] world -> [N] bool (False outside the cube)
        r = self.resolution
        cell = ((x + self.bound) * (r / (2.0 * self.bound))).floor().long().clamp(0, r - 1)  # [N, 3]
        flat = (cell[:, 0] * r + cell[:, 1]) * r + cell[:, 2]
        inside = (x.abs() <= self.bound).all(dim=-1)
        return self.occupied.reshape(-1)[flat] & inside


def sample_shading(
    step: int,
    albedo_warmup_steps: int,
    generator: torch.Generator | None = None,
    probabilities: dict[str, float] | None = None,  # shading -> probability; DREAMFUSION_SHADING if None
) -> str:
    """The shading of one training step: "albedo" during the warm-up, then a random draw."""
    if step < albedo_warmup_steps:
        return "albedo"
    probabilities = DREAMFUSION_SHADING if probabilities is None else probabilities
    for name in probabilities:
        if name not in SHADINGS:
            raise ValueError(f"probabilities keys must be in {SHADINGS}, got {name!r}")
    total = sum(probabilities.values())
    if total <= 0:
        raise ValueError(f"probabilities must sum to > 0, got {probabilities}")
    device = generator.device if generator is not None else None
    u = float(torch.rand((), generator=generator, device=device)) * total
    for name, p in probabilities.items():
        u -= p
        if u < 0:
            return name
    return name


def render_volume(
    field,  # NeRFField or any field with the same three calls (module docstring)
    cameras: Cameras,
    config: VolumeConfig,
    shading: str = "albedo",
    background: Tensor | None = None,  # [B, 3] or [B, H, W, 3] colour; None = black (premultiplied output)
    occupancy: OccupancyGrid | None = None,
    generator: torch.Generator | None = None,  # sample jitter; None = bin midpoints (evaluation)
    need_normals: bool = False,  # composite normals and the orientation loss even for "albedo"
    texture_path: bool = False,  # also return "rgb_texture": the image whose gradient reaches the albedo alone
) -> dict:
    """Render `cameras` through the field. Returns named buffers:

    rgb [B, H, W, 3] composited over the background; alpha [B, H, W, 1] accumulated opacity;
    depth [B, H, W, 1] expected distance along the ray (not camera z) of what is seen: sum w t / alpha,
    0 where the ray misses the sphere;
    and, when normals are computed (lambertian, textureless or need_normals):
    normal [B, H, W, 3] world normals composited with the weights (not renormalised; 0 on empty rays),
    orientation [] Ref-NeRF's orientation loss, sum_i stopgrad(w_i) max(0, n_i . d)^2 averaged over all
    B * H * W rays (weights detached, as DreamFusion reproductions do: it bends normals, not opacity).
    samples_evaluated (int) counts field evaluations.
    With `texture_path`, rgb_texture [B, H, W, 3]: rgb's values, through a graph that holds the weights,
    the shading and the background, so that a loss on it trains the albedo only.
    """
    config.check()
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    b, h, w = len(cameras), cameras.height, cameras.width
    if background is not None and tuple(background.shape) not in ((b, 3), (b, h, w, 3)):
        raise ValueError(f"background must have shape [{b}, 3] or [{b}, {h}, {w}, 3], got {list(background.shape)}")
    with_normals = need_normals or shading != "albedo"

    # 1. Rays, their bounding-sphere interval and the sample jitter (drawn once: chunking does not change it).
    origins, dirs = get_rays(cameras)  # [B, H, W, 3] each
    device, dtype = origins.device, origins.dtype
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    lights = cameras.light_position.to(dtype)[:, None, :].expand(b, h * w, 3).reshape(-1, 3)  # [R, 3]
    near, far, hit = intersect_sphere(origins, dirs, config.bound, config.near_min)
    num_rays = origins.shape[0]
    if generator is None:
        jitter = None
    else:
        jitter = torch.rand((num_rays, config.num_samples), generator=generator, device=generator.device)
        jitter = jitter.to(device=device, dtype=dtype)

    # 2. March the rays, chunk by chunk.
    chunk = config.chunk_size if config.chunk_size > 0 else num_rays
    parts = []
    for start in range(0, num_rays, chunk):
        sl = slice(start, start + chunk)
        parts.append(
            march_rays(
                field, config.num_samples, DREAMFUSION_AMBIENT if config.ambient is None else config.ambient, shading, with_normals, occupancy, origins[sl], dirs[sl], lights[sl],
                near[sl], far[sl], hit[sl], None if jitter is None else jitter[sl], texture_path,
            )
        )

    # 3. Assemble the image and composite over the background.
    alpha = torch.cat([p["alpha"] for p in parts]).reshape(b, h, w, 1)
    rgb = torch.cat([p["rgb"] for p in parts]).reshape(b, h, w, 3)
    if background is not None:
        bg = background.to(dtype)
        rgb = rgb + (1.0 - alpha) * (bg[:, None, None, :] if bg.dim() == 2 else bg)
    out = {
        "rgb": rgb,  # [B, H, W, 3]
        "alpha": alpha,  # [B, H, W, 1]
        "depth": torch.cat([p["depth"] for p in parts]).reshape(b, h, w, 1),  # [B, H, W, 1]
        "samples_evaluated": sum(p["samples"] for p in parts),
    }
    if texture_path:  # rgb's values; the gradient goes the albedo's way alone
        texture = torch.cat([p["rgb_texture"] for p in parts]).reshape(b, h, w, 3)
        out["rgb_texture"] = rgb.detach() + (texture - texture.detach())
    if with_normals:
        out["normal"] = torch.cat([p["normal"] for p in parts]).reshape(b, h, w, 3)  # [B, H, W, 3]
        out["orientation"] = sum(p["orientation"] for p in parts) / num_rays  # []
    return out
