"""Screen-space geometry both torch rasterizer passes share (`raster.rasterize`, `silhouette_aa.antialias_torch`):
clip positions to pixel coordinates, triangle areas and edge functions."""
from torch import Tensor


def pixel_coords(pos_clip: Tensor, H: int, W: int) -> tuple[Tensor, Tensor]:
    """Vertex positions in pixel units where pixel (i, j)'s centre is at (x=j, y=i)."""
    w = pos_clip[..., 3]
    X = (pos_clip[..., 0] / w + 1.0) * (0.5 * W) - 0.5  # [B, V]
    Y = (pos_clip[..., 1] / w + 1.0) * (0.5 * H) - 0.5  # [B, V]
    return X, Y


def signed_area(tx: Tensor, ty: Tensor) -> Tensor:
    """Twice the signed screen area of triangles given corner coords [..., 3]."""
    return (tx[..., 1] - tx[..., 0]) * (ty[..., 2] - ty[..., 0]) - (ty[..., 1] - ty[..., 0]) * (
        tx[..., 2] - tx[..., 0]
    )


def edge_values(tx: Tensor, ty: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Edge functions [P, 3] of point (px, py) [P] against edges k = (v_k, v_k+1);
    positive inside a counter-clockwise triangle (in pixel axes)."""
    nx, ny = tx.roll(-1, dims=-1), ty.roll(-1, dims=-1)
    return (nx - tx) * (py[:, None] - ty) - (ny - ty) * (px[:, None] - tx)
