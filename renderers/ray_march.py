"""Ray marching through a field: the rays' interval in the bounding sphere, stratified samples, shading and
compositing (the equations are in `renderers.volume`'s docstring, which renders whole cameras with these)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.shading import lambert

__all__ = ["intersect_sphere", "march_rays"]


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


def march_rays(
    field,  # see renderers.volume's docstring
    num_samples: int,  # samples per ray
    ambient: float,  # ambient share of the Lambertian shading
    shading: str,  # one of SHADINGS
    with_normals: bool,
    occupancy,  # renderers.volume.OccupancyGrid, or None: evaluate every sample
    origins: Tensor,  # [R, 3]
    dirs: Tensor,  # [R, 3]
    lights: Tensor,  # [R, 3]
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    hit: Tensor,  # [R] bool
    jitter: Tensor | None,  # [R, S] in [0, 1), or None for midpoints
    texture_path: bool = False,  # also "rgb_texture": the albedo's share of rgb, with weights and shading held
) -> dict:
    """rgb [R, 3] (premultiplied), alpha [R, 1], depth [R, 1] and the number of samples evaluated; normal [R, 3]
    and orientation [] with normals, rgb_texture [R, 3] with the texture path (zeros on rays that miss)."""
    num_rays, s = origins.shape[0], num_samples
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
        shade = lambert(normal, to_light, ambient)  # [M, 1]
        color = shade * (albedo if shading == "lambertian" else torch.ones_like(albedo))
    texture = None
    if texture_path and shading != "textureless":  # textureless shows no albedo: no texture path
        texture = albedo if shade is None else shade.detach() * albedo  # [M, 3]
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
