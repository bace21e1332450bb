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

SHADINGS = ("albedo", "lambertian", "textureless")
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
    ambient: float = DREAMFUSION_AMBIENT  # ambient share of Lambertian shading, in [0, 1]
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
        if not 0.0 <= self.ambient <= 1.0:
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


def intersect_sphere(
    origins: Tensor,  # [R, 3]
    dirs: Tensor,  # [R, 3] unit
    radius: float,
    near_min: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Entry and exit distances of rays through the sphere |x| = radius: (near [R], far [R], hit [R] bool)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    root = disc.clamp_min(0.0).sqrt()
    near = (-b - root).clamp_min(near_min)
    far = -b + root
    return near, far, (disc > 0) & (far > near)


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
            _render_rays(
                field, config, shading, with_normals, occupancy, origins[sl], dirs[sl], lights[sl],
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


def _render_rays(
    field,
    config: VolumeConfig,
    shading: str,
    with_normals: bool,
    occupancy: OccupancyGrid | None,
    origins: Tensor,  # [R, 3]
    dirs: Tensor,  # [R, 3]
    lights: Tensor,  # [R, 3]
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    hit: Tensor,  # [R] bool
    jitter: Tensor | None,  # [R, S] in [0, 1), or None for midpoints
    texture_path: bool = False,  # also "rgb_texture": the albedo's share of rgb, with weights and shading held
) -> dict:
    num_rays, s = origins.shape[0], config.num_samples
    device, dtype = origins.device, origins.dtype
    rays = hit.nonzero().squeeze(1)  # only rays that cross the sphere are marched
    nh = rays.shape[0]

    # Stratified distances: bin i of [near, far] holds sample i.
    o, d, lo, hi = origins[rays], dirs[rays], near[rays, None], far[rays, None]
    bins = torch.arange(s, device=device, dtype=dtype)[None]  # [1, S]
    u = (bins + 0.5) if jitter is None else (bins + jitter[rays])
    delta = (hi - lo) / s  # [Rh, 1] bin width
    t = lo + delta * u  # [Rh, S]
    points = (o[:, None, :] + t[..., None] * d[:, None, :]).reshape(-1, 3)  # [Rh * S, 3]

    # Evaluate the field only where the occupancy grid allows; elsewhere sigma = 0.
    keep = None if occupancy is None else occupancy.lookup(points).nonzero().squeeze(1)  # [M]
    x = points if keep is None else points[keep]  # [M, 3]
    normal = None
    if x.shape[0] == 0:
        sigma, albedo = x.new_zeros(0), x.new_zeros(0, 3)
        normal = x.new_zeros(0, 3)
    elif with_normals:
        sigma, albedo, normal = field.forward_with_normal(x, create_graph=torch.is_grad_enabled())
    else:
        sigma, albedo = field(x)

    if shading == "albedo":
        color = albedo  # [M, 3]
        shade = None
    else:
        light_at = lights[rays][:, None, :].expand(nh, s, 3).reshape(-1, 3)
        light_at = light_at if keep is None else light_at[keep]
        to_light = F.normalize(light_at - x, dim=-1)
        lambert = (normal * to_light).sum(-1).clamp_min(0.0)
        shade = config.ambient + (1.0 - config.ambient) * lambert  # [M]
        color = shade[:, None] * (albedo if shading == "lambertian" else torch.ones_like(albedo))
    texture = None
    if texture_path and shading != "textureless":  # textureless shows no albedo: no texture path
        texture = albedo if shade is None else shade.detach()[:, None] * albedo  # [M, 3]
    if keep is not None:
        n = nh * s
        sigma = x.new_zeros(n).index_copy(0, keep, sigma.to(dtype))
        color = x.new_zeros(n, 3).index_copy(0, keep, color.to(dtype))
        if normal is not None:
            normal = x.new_zeros(n, 3).index_copy(0, keep, normal.to(dtype))

    # Composite: w_i = T_i alpha_i with T_i = exp(-sum_{j<i} sigma_j delta_j).
    tau = sigma.reshape(nh, s) * delta  # [Rh, S] optical depth of each sample
    alpha_i = 1.0 - torch.exp(-tau)
    before = torch.cat([tau.new_zeros(nh, 1), torch.cumsum(tau, dim=1)[:, :-1]], dim=1)  # exclusive
    weights = alpha_i * torch.exp(-before)  # [Rh, S]
    acc = weights.sum(1)  # [Rh]
    rgb = (weights[..., None] * color.reshape(nh, s, 3)).sum(1)  # [Rh, 3]
    depth = (weights * t).sum(1) / acc.clamp_min(1e-6)  # [Rh]

    def scatter(values: Tensor, width: int) -> Tensor:  # [Rh, width] -> [R, width], zeros on missed rays
        return values.new_zeros(num_rays, width).index_copy(0, rays, values)

    out = {
        "rgb": scatter(rgb, 3),
        "alpha": scatter(acc[:, None], 1),
        "depth": scatter(depth[:, None], 1),
        "samples": int(x.shape[0]),
    }
    if texture_path:  # the albedo's share of rgb with the weights held (0 for textureless)
        held = rgb.new_zeros(nh, 3)
        if texture is not None and keep is None:
            held = (weights.detach()[..., None] * texture.reshape(nh, s, 3)).sum(1)
        elif texture is not None:  # the evaluated samples only: [M] of the nh * s
            held = held.index_add(0, keep // s, weights.detach().reshape(-1)[keep, None] * texture.to(dtype))
        out["rgb_texture"] = scatter(held, 3)
    if with_normals:
        normal = normal.reshape(nh, s, 3)
        out["normal"] = scatter((weights[..., None] * normal).sum(1), 3)
        facing = (normal * d[:, None, :]).sum(-1).clamp_min(0.0)  # [Rh, S] > 0: normal faces away from the camera
        out["orientation"] = (weights.detach() * facing.square()).sum()
    return out
