"""Multiresolution hash encoding (Instant-NGP, Mueller et al. 2022) in plain PyTorch.

Level l has `resolutions[l]` cells per axis, i.e. (R + 1)^3 vertices, each holding
`features_per_level` learned features. A level whose dense vertex grid fits in the
table (`(R + 1)^3 <= 2^log2_table_size`) indexes it directly; finer levels hash the
integer vertex coordinates: (i * 1) xor (j * 2654435761) xor (k * 805459861) mod T.
A point's feature at one level is the trilinear interpolation of its cell's 8 corners.

All levels share one flat table [F, sum of level sizes]; one gather per feature channel
fetches the 8 corners of every level at once. Everything is ordinary autograd, so the output is
differentiable (twice) w.r.t. both the table and the input positions, which is what
density-gradient normals and their losses need.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Instant-NGP's primes for the spatial hash; the first coordinate uses 1 (cache coherence).
HASH_PRIMES = (1, 2654435761, 805459861)


class HashGridEncoding(nn.Module):
    def __init__(
        self,
        num_levels: int = 12,  # number of resolution levels L
        features_per_level: int = 2,  # features per level F
        log2_table_size: int = 17,  # log2 of the entries per level's table T
        base_resolution: int = 16,  # cells per axis of the coarsest level
        max_resolution: int = 1024,  # cells per axis of the finest level
        bound: float = 1.0,  # inputs lie in [-bound, bound]^3 (clamped to it)
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if features_per_level < 1:
            raise ValueError(f"features_per_level must be >= 1, got {features_per_level}")
        if not 4 <= log2_table_size <= 30:
            raise ValueError(f"log2_table_size must lie in [4, 30], got {log2_table_size}")
        if base_resolution < 1:
            raise ValueError(f"base_resolution must be >= 1, got {base_resolution}")
        if max_resolution < base_resolution:
            raise ValueError(f"max_resolution must be >= base_resolution={base_resolution}, got {max_resolution}")
        if bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.num_levels = num_levels
        self.features_per_level = features_per_level
        self.log2_table_size = log2_table_size
        self.bound = float(bound)
        table_size = 2**log2_table_size

        # Per-level scale b so that the last level reaches max_resolution: R_l = floor(base * b^l).
        scale = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(num_levels - 1, 1))
        self.per_level_scale = scale
        self.resolutions = [int(math.floor(base_resolution * scale**level + 1e-6)) for level in range(num_levels)]
        self.dense = [(r + 1) ** 3 <= table_size for r in self.resolutions]
        sizes = [(r + 1) ** 3 if dense else table_size for r, dense in zip(self.resolutions, self.dense)]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.level_sizes = sizes
        self.level_offsets = offsets

        # Instant-NGP's init: small uniform values so the encoding starts near zero.
        # Stored feature-major, [F, rows]: row r of level l is column offsets[l] + local index.
        self.table = nn.Parameter(torch.empty(features_per_level, sum(sizes)).uniform_(-1e-4, 1e-4))
        # int32 index arithmetic (faster) when every product and row fits; the hash keeps only
        # the low log2_table_size bits, so primes reduced mod T give the same rows.
        fits_int32 = sum(sizes) < 2**31 and (max(self.resolutions) + 1) * table_size < 2**31
        self._index_dtype = torch.int32 if fits_int32 else torch.long

        dense_levels = [l for l in range(num_levels) if self.dense[l]]
        hashed_levels = [l for l in range(num_levels) if not self.dense[l]]
        # Levels are processed in two vectorised groups; `order` restores the level order.
        self._groups = (dense_levels, hashed_levels)
        self.register_buffer("_order", torch.argsort(torch.tensor(dense_levels + hashed_levels)), persistent=False)
        self.register_buffer(
            "_res", torch.tensor([float(self.resolutions[l]) for l in dense_levels + hashed_levels]), persistent=False
        )
        self.register_buffer(
            "_offsets", torch.tensor([offsets[l] for l in dense_levels + hashed_levels], dtype=torch.long),
            persistent=False,
        )
        # Dense strides (1, R+1, (R+1)^2) per dense level: [Ld, 3].
        strides = [[1, self.resolutions[l] + 1, (self.resolutions[l] + 1) ** 2] for l in dense_levels]
        self.register_buffer("_strides", torch.tensor(strides, dtype=torch.long).reshape(-1, 3), persistent=False)
        # Primes reduced modulo T: the final `& (T - 1)` keeps only the low bits anyway.
        self.register_buffer(
            "_primes", torch.tensor([p % table_size for p in HASH_PRIMES], dtype=torch.long), persistent=False
        )
        self._mask = table_size - 1

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def extra_repr(self) -> str:
        return (
            f"levels={self.num_levels}, features={self.features_per_level}, table=2^{self.log2_table_size}, "
            f"resolutions={self.resolutions[0]}..{self.resolutions[-1]}, dense_levels={sum(self.dense)}"
        )

    def vertex_index(self, level: int, coords: Tensor) -> Tensor:
        """Column of `table` holding vertex `coords` [N, 3] (integers in [0, R]) of `level` -> [N]."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must lie in [0, {self.num_levels}), got {level}")
        coords = coords.long()
        if self.dense[level]:
            r1 = self.resolutions[level] + 1
            local = coords[:, 0] + coords[:, 1] * r1 + coords[:, 2] * r1 * r1
        else:
            p = self._primes
            local = ((coords[:, 0] * p[0]) ^ (coords[:, 1] * p[1]) ^ (coords[:, 2] * p[2])) & self._mask
        return local + self.level_offsets[level]

    def forward(self, x: Tensor) -> Tensor:  # x: [N, 3] in [-bound, bound] -> [N, L * F]
        if x.dim() != 2 or x.shape[-1] != 3:
            raise ValueError(f"x must have shape [N, 3], got {list(x.shape)}")
        n, num_levels = x.shape[0], self.num_levels
        # Layout [L, ..., N] with the points last: elementwise ops then run over long contiguous rows.
        u = ((x.clamp(-self.bound, self.bound) + self.bound) / (2.0 * self.bound)).t()  # [3, N] in [0, 1]
        res = self._res.to(x.dtype)
        pos = u[None] * res[:, None, None]  # [L, 3, N] in cell units
        # Lower corner; points on the far face use the last cell (frac = 1).
        corner = torch.minimum(pos.detach().floor(), (res - 1.0)[:, None, None])  # [L, 3, N]
        frac = pos - corner  # [L, 3, N], carries the gradient w.r.t. x
        index = self._corner_rows(corner.to(self._index_dtype))  # [L, 8, N]

        # Trilinear interpolation as 7 lerps (z, then y, then x): far fewer elementwise passes
        # than weighting 8 corners, also in the double backward that normals need. `unbind`
        # rather than slicing: its backward stacks, where slicing's backward fills zeros first.
        fx, fy, fz = (f[:, None] for f in frac.unbind(1))  # [L, 1, N] each
        flat_index = index.reshape(-1)
        outs = []
        for table_row in self.table.unbind(0):
            # One gather per feature channel from a contiguous table row (much faster on CPU than
            # gathering [F]-wide rows); it covers all levels and corners at once.
            g = table_row.index_select(0, flat_index).view(num_levels, 4, 2, n)  # [L, (dx, dy), dz, N]
            gz = torch.lerp(*g.unbind(2), fz).view(num_levels, 2, 2, n)  # [L, dx, dy, N]
            gy = torch.lerp(*gz.unbind(2), fy)  # [L, dx, N]
            outs.append(torch.lerp(*gy.unbind(1), fx[:, 0]))  # [L, N]
        out = torch.stack(outs, dim=-1).index_select(0, self._order)  # [L, N, F] in level order
        return out.permute(1, 0, 2).reshape(n, self.output_dim)

    def _corner_rows(self, corner: Tensor) -> Tensor:  # corner: [L, 3, N] integer -> table rows [L, 8, N]
        n = corner.shape[-1]
        step = torch.tensor([0, 1], device=corner.device, dtype=corner.dtype)[None, :, None]  # [1, 2, 1]
        num_dense = len(self._groups[0])
        parts = []
        if num_dense > 0:
            c = corner[:num_dense]
            s = self._strides.to(corner.dtype)  # [Ld, 3]
            ix = (c[:, 0:1] + step) * s[:, 0, None, None]  # [Ld, 2, N]
            iy = (c[:, 1:2] + step) * s[:, 1, None, None]
            iz = (c[:, 2:3] + step) * s[:, 2, None, None]
            parts.append(ix[:, :, None, None] + iy[:, None, :, None] + iz[:, None, None, :])
        if num_dense < self.num_levels:
            c = corner[num_dense:]
            p = self._primes.to(corner.dtype)
            hx = (c[:, 0:1] + step) * p[0]  # [Lh, 2, N]
            hy = (c[:, 1:2] + step) * p[1]
            hz = (c[:, 2:3] + step) * p[2]
            parts.append((hx[:, :, None, None] ^ hy[:, None, :, None] ^ hz[:, None, None, :]) & self._mask)
        index = torch.cat(parts, dim=0) + self._offsets.to(corner.dtype)[:, None, None, None, None]
        return index.reshape(self.num_levels, 8, n)
