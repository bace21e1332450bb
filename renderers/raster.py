"""Differentiable mesh rasterizer with nvdiffrast's API, in pure PyTorch (runs anywhere, CPU included).

Four functions (`rasterize`, `interpolate`, `texture`, `antialias`; the antialiasing's walk lives in
`renderers/silhouette_aa.py`) and the input checks they share with nvdiffrast's wrappers. A run picks
its backend once, as a `renderers.rasterizer.Rasterizer` ("torch": these functions, or nvdiffrast on CUDA).

Conventions (nvdiffrast's):
- Pixel (row i, column j) covers NDC x in [-1 + 2j/W, -1 + 2(j+1)/W] and NDC y in
  [-1 + 2i/H, -1 + 2(i+1)/H]; its sample is the pixel centre.
- `rast` [B, H, W, 4] = (u, v, z/w, triangle_id + 1), all zero on background; an
  attribute interpolates as u*a0 + v*a1 + (1-u-v)*a2 with (a0, a1, a2) the attributes
  of tri[id]'s three vertices. Triangle ids are stored as float32 (exact up to 2^24).
- `rasterize` returns only `rast` (nvdiffrast's second output, the image-space
  derivatives `rast_db`, is dropped: no mipmapped texturing here).

Limits of this PyTorch rasterizer (documented, deliberate):
- Triangles with any vertex at w <= 0 (partly behind the camera) are skipped whole
  instead of being clipped; degenerate (zero screen area) triangles are skipped.
- Per pixel, only depths with -1 <= z/w <= 1 are visible (near/far clipping).
- Gradients flow from u, v and z/w to `pos_clip`; nvdiffrast propagates none through z.
"""

import torch
from torch import Tensor

from renderers.screen import edge_values, pixel_coords, signed_area
from renderers.silhouette_aa import antialias_torch

__all__ = [
    "antialias", "check_antialias", "check_interpolate", "check_rasterize", "check_texture", "interpolate",
    "rasterize", "texture",
]


# --------------------------------------------------------------------------- helpers
def _check_mesh(pos_clip: Tensor, tri: Tensor) -> None:
    if pos_clip.dim() != 3 or pos_clip.shape[-1] != 4:
        raise ValueError(f"pos_clip must have shape [B, V, 4], got {tuple(pos_clip.shape)}")
    if tri.dim() != 2 or tri.shape[-1] != 3:
        raise ValueError(f"tri must have shape [F, 3], got {tuple(tri.shape)}")
    if tri.dtype.is_floating_point:
        raise ValueError(f"tri must be an integer tensor, got {tri.dtype}")


def _check_rast(rast: Tensor) -> None:
    if rast.dim() != 4 or rast.shape[-1] != 4:
        raise ValueError(f"rast must have shape [B, H, W, 4], got {tuple(rast.shape)}")


def check_rasterize(pos_clip: Tensor, tri: Tensor, resolution: tuple[int, int], chunk_size: int) -> tuple[int, int]:
    """`rasterize`'s inputs checked; returns the resolution (H, W) as ints."""
    _check_mesh(pos_clip, tri)
    H, W = (int(r) for r in resolution)
    if H < 1 or W < 1:
        raise ValueError(f"resolution must be >= 1 in both dimensions, got {tuple(resolution)}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
    return H, W


def check_interpolate(attr: Tensor, rast: Tensor) -> Tensor:
    """`interpolate`'s inputs checked; returns attr batched, [B or 1, V, C]."""
    _check_rast(rast)
    if attr.dim() == 2:
        attr = attr[None]
    if attr.dim() != 3 or attr.shape[0] not in (1, rast.shape[0]):
        raise ValueError(f"attr must have shape [V, C] or [B or 1, V, C], got {tuple(attr.shape)}")
    return attr


def check_texture(tex: Tensor, uv: Tensor, filter: str, boundary: str) -> None:
    """`texture`'s inputs checked."""
    if tex.dim() != 4 or uv.dim() != 4 or uv.shape[-1] != 2:
        raise ValueError(f"tex must be [B, Ht, Wt, C] and uv [B, H, W, 2], got {tuple(tex.shape)}, {tuple(uv.shape)}")
    if filter not in ("linear", "nearest"):
        raise ValueError(f"filter must be 'linear' or 'nearest', got {filter!r}")
    if boundary not in ("wrap", "clamp", "zero"):
        raise ValueError(f"boundary must be 'wrap', 'clamp' or 'zero', got {boundary!r}")
    if tex.shape[0] not in (1, uv.shape[0]):
        raise ValueError(f"tex batch must be 1 or {uv.shape[0]}, got {tex.shape[0]}")


def check_antialias(color: Tensor, rast: Tensor, pos_clip: Tensor, tri: Tensor) -> None:
    """`antialias`'s inputs checked."""
    _check_rast(rast)
    _check_mesh(pos_clip, tri)
    if color.dim() != 4 or color.shape[:3] != rast.shape[:3]:
        raise ValueError(f"color must have shape [B, H, W, C] matching rast, got {tuple(color.shape)}")


def _float_order_key(z: Tensor) -> Tensor:
    """int64 keys [P] that sort like the float32 values z [P] (exact, no quantisation)."""
    bits = z.float().contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


# --------------------------------------------------------------------------- rasterize
def rasterize(
    pos_clip: Tensor,  # [B, V, 4] clip-space vertex positions
    tri: Tensor,  # [F, 3] integer vertex indices
    resolution: tuple[int, int],  # (H, W) in pixels
    chunk_size: int = 0,  # triangles per visibility pass, 0 = all at once
) -> Tensor:  # [B, H, W, 4] = (u, v, z/w, triangle_id + 1), zeros on background
    """Rasterize triangles; returns `rast` only (see the module docstring).

    Visibility (which triangle wins a pixel) is found without gradient by
    enumerating each triangle's pixel bounding box, testing pixel centres against the
    triangle's edges and keeping the nearest z/w with a scatter-min on packed
    (depth, triangle) keys. The barycentrics of the winning triangle are then recomputed
    differentiably from `pos_clip`, perspective-correct. Memory scales with the summed
    bounding-box areas of one chunk of triangles, hence `chunk_size`.
    """
    H, W = check_rasterize(pos_clip, tri, resolution, chunk_size)
    winner = _visible_triangles(pos_clip.detach(), tri.long(), H, W, chunk_size)
    return _barycentric_buffer(pos_clip, tri.long(), winner, H, W)


def _visible_triangles(pos: Tensor, tri: Tensor, H: int, W: int, chunk_size: int) -> Tensor:
    """Index of the nearest triangle per pixel, flat [B*H*W] long, -1 on background."""
    B, F = pos.shape[0], tri.shape[0]
    dev = pos.device
    X, Y = pixel_coords(pos, H, W)
    Z = pos[..., 2] / pos[..., 3]
    tx, ty, tz = X[:, tri], Y[:, tri], Z[:, tri]  # [B, F, 3]
    area = signed_area(tx, ty)  # [B, F]
    valid = (pos[..., 3][:, tri] > 0).all(-1) & (area.abs() > 1e-8) & torch.isfinite(area)
    # Pixel-centre bounding boxes, clamped to the image (before the cast, against overflow).
    x_lo = tx.amin(-1).ceil().clamp(0, W).long()
    x_hi = tx.amax(-1).floor().clamp(-1, W - 1).long()
    y_lo = ty.amin(-1).ceil().clamp(0, H).long()
    y_hi = ty.amax(-1).floor().clamp(-1, H - 1).long()
    n_x = (x_hi - x_lo + 1).clamp(min=0)
    count = torch.where(valid, n_x * (y_hi - y_lo + 1).clamp(min=0), 0)  # [B, F]

    empty = torch.iinfo(torch.int64).max
    zbuf = torch.full((B * H * W,), empty, dtype=torch.int64, device=dev)
    step = max(F, 1) if chunk_size == 0 else chunk_size
    for f0 in range(0, F, step):
        sl = slice(f0, min(F, f0 + step))
        cnt = count[:, sl].reshape(-1)  # [N] per (batch, triangle) of this chunk
        total = int(cnt.sum())
        if total == 0:
            continue
        n_tri = sl.stop - sl.start
        item = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev), cnt, output_size=total)
        local = torch.arange(total, device=dev) - (torch.cumsum(cnt, 0) - cnt)[item]
        b, f = item // n_tri, item % n_tri + f0
        nx = n_x[b, f]
        col = x_lo[b, f] + local % nx
        row = y_lo[b, f] + local // nx
        del item, local, nx
        cx, cy = tx[b, f], ty[b, f]  # [P, 3]
        e = edge_values(cx, cy, col.to(cx.dtype), row.to(cx.dtype)) * area[b, f].sign()[:, None]
        # Screen-space barycentric of vertex k+2 is e_k / area; z/w is affine in screen space.
        z = (e * tz[b, f].roll(1, dims=-1)).sum(-1) / area[b, f].abs()
        keep = (e >= 0).all(-1) & (z >= -1) & (z <= 1)
        pix = (b * H + row) * W + col
        key = _float_order_key(z[keep]) * (1 << 32) + f[keep]
        zbuf.scatter_reduce_(0, pix[keep], key, reduce="amin", include_self=True)
    return torch.where(zbuf == empty, -1, zbuf & 0xFFFFFFFF)


def _barycentric_buffer(pos: Tensor, tri: Tensor, winner: Tensor, H: int, W: int) -> Tensor:
    """Differentiable (u, v, z/w, id+1) [B, H, W, 4] at pixel centres of covered pixels."""
    B = pos.shape[0]
    pix = (winner >= 0).nonzero().squeeze(1)  # [P]
    f = winner[pix]
    b, rem = pix // (H * W), pix % (H * W)
    px = (2.0 * (rem % W).to(pos.dtype) + 1.0) / W - 1.0  # pixel-centre NDC
    py = (2.0 * (rem // W).to(pos.dtype) + 1.0) / H - 1.0
    v = pos[b[:, None], tri[f]]  # [P, 3, 4]
    # The clip-space point sum_k b_k v_k projects onto (px, py): b is orthogonal to both
    # (x_k - px w_k)_k and (y_k - py w_k)_k, so it is their cross product, normalised.
    r1 = v[..., 0] - px[:, None] * v[..., 3]
    r2 = v[..., 1] - py[:, None] * v[..., 3]
    bary = torch.linalg.cross(r1, r2, dim=-1)
    bary = bary / bary.sum(-1, keepdim=True)
    z = (bary * v[..., 2]).sum(-1) / (bary * v[..., 3]).sum(-1)
    vals = torch.stack([bary[:, 0], bary[:, 1], z, (f + 1).to(pos.dtype)], dim=-1)
    rast = pos.new_zeros(B * H * W, 4).index_put((pix,), vals)
    return rast.view(B, H, W, 4)


# --------------------------------------------------------------------------- interpolate
def interpolate(
    attr: Tensor,  # [B, V, C] or [V, C] vertex attributes (batch 1 broadcasts)
    rast: Tensor,  # [B, H, W, 4] output of rasterize
    tri: Tensor,  # [F, 3] integer vertex indices
) -> Tensor:  # [B, H, W, C], zeros on background
    """Interpolate vertex attributes at each pixel (differentiable w.r.t. attr and rast's u, v)."""
    attr = check_interpolate(attr, rast)
    B, H, W, _ = rast.shape
    flat = rast.reshape(-1, 4)
    tid = (flat[:, 3].detach() + 0.5).long() - 1
    pix = (tid >= 0).nonzero().squeeze(1)
    b = pix // (H * W) if attr.shape[0] > 1 else torch.zeros_like(pix)
    a = attr[b[:, None], tri.long()[tid[pix]]]  # [P, 3, C]
    u, v = flat[pix, 0:1], flat[pix, 1:2]
    vals = u * a[:, 0] + v * a[:, 1] + (1.0 - u - v) * a[:, 2]
    out = vals.new_zeros(B * H * W, attr.shape[-1]).index_put((pix,), vals)
    return out.view(B, H, W, -1)


# --------------------------------------------------------------------------- texture
def texture(
    tex: Tensor,  # [B, Ht, Wt, C] texture (batch 1 broadcasts)
    uv: Tensor,  # [B, H, W, 2] texture coordinates
    filter: str = "linear",  # "linear" (bilinear) or "nearest"
    boundary: str = "wrap",  # "wrap", "clamp" (to boundary texel centres) or "zero"
) -> Tensor:  # [B, H, W, C]
    """Texture lookup with nvdiffrast's convention: uv (0, 0) is the start of the texture
    in memory (tex[:, 0, 0]); u runs along the width, v along the rows; texel (row r,
    column c) has its centre at uv = ((c + 0.5) / Wt, (r + 0.5) / Ht).
    Differentiable w.r.t. tex and (for "linear") uv."""
    check_texture(tex, uv, filter, boundary)
    B, H, W, _ = uv.shape
    Ht, Wt, C = tex.shape[1:]
    fx = uv[..., 0].reshape(B, -1) * Wt - 0.5  # [B, HW] texel coordinates
    fy = uv[..., 1].reshape(B, -1) * Ht - 0.5
    if boundary == "clamp":
        fx, fy = fx.clamp(0, Wt - 1), fy.clamp(0, Ht - 1)
    if filter == "nearest":
        fx, fy = fx.detach().round(), fy.detach().round()
    x0, y0 = fx.detach().floor(), fy.detach().floor()
    wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]
    flat = tex.reshape(tex.shape[0], Ht * Wt, C).expand(B, -1, -1)

    def fetch(xi: Tensor, yi: Tensor) -> Tensor:  # integer texel coords [B, HW] -> [B, HW, C]
        xi, yi = xi.long(), yi.long()
        inside = (xi >= 0) & (xi < Wt) & (yi >= 0) & (yi < Ht)
        xi = xi % Wt if boundary == "wrap" else xi.clamp(0, Wt - 1)
        yi = yi % Ht if boundary == "wrap" else yi.clamp(0, Ht - 1)
        out = torch.gather(flat, 1, (yi * Wt + xi)[..., None].expand(-1, -1, C))
        return out * inside[..., None] if boundary == "zero" else out

    top = fetch(x0, y0) * (1 - wx) + fetch(x0 + 1, y0) * wx
    bottom = fetch(x0, y0 + 1) * (1 - wx) + fetch(x0 + 1, y0 + 1) * wx
    return (top * (1 - wy) + bottom * wy).view(B, H, W, C)


# --------------------------------------------------------------------------- antialias
def antialias(
    color: Tensor,  # [B, H, W, C] shaded image
    rast: Tensor,  # [B, H, W, 4] output of rasterize for pos_clip, tri
    pos_clip: Tensor,  # [B, V, 4] the clip-space positions that produced rast
    tri: Tensor,  # [F, 3] integer vertex indices
) -> Tensor:  # [B, H, W, C]
    """Analytic silhouette antialiasing whose output is differentiable w.r.t. pos_clip.

    For each horizontally or vertically adjacent pixel pair (A, B) with different
    triangle ids, A being the nearer one (background is farthest), follow the segment
    A->B from A's triangle across shared edges of same-facing neighbours (thin grazing
    triangles near a silhouette often cover no pixel centre) until it leaves the surface
    through a silhouette edge: a mesh boundary, or an edge whose neighbour faces the
    other way on screen. If that edge is more perpendicular to the pair than parallel
    (steep edges for horizontal pairs, flat ones for vertical pairs, so each edge is
    handled in one direction), its crossing parameter t in [0, 1] along A->B gives the
    coverage of the pixel footprints: B gets (t - 1/2) of A's colour if t > 1/2, else A
    gets (1/2 - t) of B's colour. t is computed from pos_clip, so the loss gradient
    reaches silhouette vertices. Winding must be consistent for facing tests to work.
    """
    check_antialias(color, rast, pos_clip, tri)
    return antialias_torch(color, rast, pos_clip, tri)
