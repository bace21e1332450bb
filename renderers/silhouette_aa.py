"""The PyTorch backend of `renderers.raster.antialias`: analytic silhouette antialiasing.

See `raster.antialias` for the method; this module holds its implementation, the walk
over same-facing neighbours to the silhouette edge, and the mesh-adjacency helpers.
"""
import torch
from torch import Tensor

from renderers.screen import edge_values, pixel_coords, signed_area

_MAX_HOPS = 32  # front-facing triangles a pixel-pair segment may cross before its silhouette edge


def antialias_torch(
    color: Tensor,  # [B, H, W, C] shaded image
    rast: Tensor,  # [B, H, W, 4] output of rasterize for pos_clip, tri
    pos_clip: Tensor,  # [B, V, 4] the clip-space positions that produced rast
    tri: Tensor,  # [F, 3] integer vertex indices
) -> Tensor:  # [B, H, W, C]
    """`raster.antialias` in PyTorch (inputs already checked there)."""
    B, H, W, C = color.shape
    tri = tri.long()
    X, Y = pixel_coords(pos_clip, H, W)  # differentiable [B, V]
    neighbour = _edge_neighbours(tri, pos_clip.shape[1])  # [F, 3]
    facing = _screen_facing(X.detach(), Y.detach(), pos_clip[..., 3].detach(), tri)  # [B, F]
    tid = (rast[..., 3].detach() + 0.5).long().reshape(-1) - 1  # [BHW]
    depth = torch.where(tid >= 0, rast[..., 2].detach().reshape(-1), float("inf"))
    flat = color.reshape(-1, C)
    out = flat
    index = torch.arange(B * H * W, device=color.device).view(B, H, W)
    for first, step, horizontal in (
        (index[:, :, :-1].reshape(-1), 1, True),
        (index[:, :-1, :].reshape(-1), W, False),
    ):
        second = first + step
        diff = tid[first] != tid[second]
        p0, p1 = first[diff], second[diff]
        nearer0 = depth[p0] <= depth[p1]
        pa, pb = torch.where(nearer0, p0, p1), torch.where(nearer0, p1, p0)
        b = pa // (H * W)
        ra, rb = pa % (H * W), pb % (H * W)
        ax, ay, bx, by = (ra % W).to(X.dtype), (ra // W).to(X.dtype), (rb % W).to(X.dtype), (rb // W).to(X.dtype)
        with torch.no_grad():
            found, f, k = _walk_to_silhouette(X, Y, tri, neighbour, facing, b, tid[pa], ax, ay, bx, by)
        b, f, k, pa, pb = b[found], f[found], k[found], pa[found], pb[found]
        ax, ay, bx, by = ax[found], ay[found], bx[found], by[found]
        # Differentiable crossing of edge k of triangle f with the segment A->B.
        vid = tri[f]  # [P, 3]
        tx, ty = X[b[:, None], vid], Y[b[:, None], vid]  # [P, 3]
        kk = k[:, None]
        x0, y0 = tx.gather(1, kk).squeeze(1), ty.gather(1, kk).squeeze(1)
        x1, y1 = tx.roll(-1, dims=-1).gather(1, kk).squeeze(1), ty.roll(-1, dims=-1).gather(1, kk).squeeze(1)
        e_a = (x1 - x0) * (ay - y0) - (y1 - y0) * (ax - x0)
        e_b = (x1 - x0) * (by - y0) - (y1 - y0) * (bx - x0)
        t = e_a / (e_a - e_b)
        dx, dy = (x1 - x0).detach().abs(), (y1 - y0).detach().abs()
        ok = (dy >= dx if horizontal else dx > dy) & (t.detach() >= 0) & (t.detach() <= 1)
        t, pa, pb = t[ok], pa[ok], pb[ok]
        w = (t - 0.5)[:, None]
        target = torch.where(w.detach().squeeze(1) > 0, pb, pa)
        # Both cases reduce to the same delta: the target moves by w * (c_A - c_B).
        out = out.index_add(0, target, w * (flat[pa] - flat[pb]))
    return out.view(B, H, W, C)




def _walk_to_silhouette(
    X: Tensor,  # [B, V] vertex x in pixel units
    Y: Tensor,  # [B, V]
    tri: Tensor,  # [F, 3]
    neighbour: Tensor,  # [F, 3] triangle across edge k, -1 if none
    facing: Tensor,  # [B, F] +1 / -1 screen orientation, 0 when not rasterized
    b: Tensor,  # [P] batch index of each pixel pair
    f: Tensor,  # [P] triangle visible at A
    ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor,  # [P] pixel centres of A and B
) -> tuple[Tensor, Tensor, Tensor]:  # found [P] bool, triangle [P], edge [P]
    """Follow A->B from f over same-facing neighbours to the silhouette edge it leaves by."""
    found = torch.zeros_like(f, dtype=torch.bool)
    edge = torch.zeros_like(f)
    tri_at = f.clone()
    active = torch.arange(f.numel(), device=f.device)
    for _ in range(_MAX_HOPS):
        if active.numel() == 0:
            break
        cb, cf = b[active], tri_at[active]
        vid = tri[cf]
        tx, ty = X[cb[:, None], vid], Y[cb[:, None], vid]
        sign = facing[cb, cf][:, None]
        e_a = edge_values(tx, ty, ax[active], ay[active]) * sign
        e_b = edge_values(tx, ty, bx[active], by[active]) * sign
        exiting = e_b < e_a  # the edge's inside value falls along A->B
        t_k = torch.where(exiting, e_a / torch.where(exiting, e_a - e_b, 1.0), float("inf"))
        t, k = t_k.min(-1)
        leaves = t <= 1  # the segment leaves this triangle before reaching B
        nb = neighbour[cf, k]
        same = (nb >= 0) & (facing[cb, nb.clamp(min=0)] == facing[cb, cf])
        done = leaves & ~same
        found[active[done]] = True
        edge[active[done]] = k[done]
        cont = leaves & same
        tri_at[active[cont]] = nb[cont]
        active = active[cont]
    return found, tri_at, edge


def _edge_neighbours(tri: Tensor, V: int) -> Tensor:
    """[F, 3] long: the triangle sharing edge k = (v_k, v_k+1), or -1 when the edge is a
    boundary or is shared by more than two triangles."""
    F = tri.shape[0]
    ends = torch.stack([tri, tri.roll(-1, dims=1)], dim=-1)  # [F, 3, 2]
    key = (ends.amin(-1) * V + ends.amax(-1)).reshape(-1)  # undirected edge id per half-edge
    sorted_key, order = key.sort()
    n = key.numel()
    eq = sorted_key[1:] == sorted_key[:-1]  # [n - 1] sorted neighbours share an edge
    pad = torch.zeros(2, dtype=torch.bool, device=key.device)
    eq = torch.cat([pad, eq, pad])  # eq[p + 2] = sorted p and p+1 equal
    pos = torch.arange(n, device=key.device)
    prev2, prev1, next1, next2 = eq[pos], eq[pos + 1], eq[pos + 2], eq[pos + 3]
    # A manifold edge is a run of exactly two equal keys.
    first = next1 & ~prev1 & ~next2
    second = prev1 & ~next1 & ~prev2
    partner_sorted = torch.where(first, pos + 1, torch.where(second, pos - 1, -1))
    partner = torch.full_like(key, -1)
    has = partner_sorted >= 0
    partner[order[has]] = order[partner_sorted[has]]
    return torch.where(partner >= 0, partner // 3, -1).view(F, 3)


def _screen_facing(X: Tensor, Y: Tensor, w: Tensor, tri: Tensor) -> Tensor:
    """[B, F] float: sign of each triangle's screen area, 0 when it is not rasterized."""
    tx, ty = X[:, tri], Y[:, tri]
    area = signed_area(tx, ty)
    drawn = (w[:, tri] > 0).all(-1) & (area.abs() > 1e-8) & torch.isfinite(area)
    return torch.where(drawn, area.sign(), 0.0)
