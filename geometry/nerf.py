"""The coarse stage's scene: a density + albedo field on a hash grid, with DreamFusion's density blob.

sigma(x) = act(mlp(enc(x))[0] + density_bias + blob(x)), albedo(x) = sigmoid(mlp(enc(x))[1:4]).
The blob is Magic3D's linear cone, clamped at zero: blob(x) = blob_density * max(0, 1 - |x| / blob_radius).
It makes a fresh field a soft ball at the origin (something for SDS to shape) while
`density_bias` keeps the empty space around it nearly transparent; an initial density
that makes every ray opaque stalls learning. Points outside [-bound, bound]^3 have zero density.

Normals are n = -grad(sigma) / |grad(sigma)| (DreamFusion), by autograd. With
create_graph=True they stay differentiable w.r.t. the parameters (Lambertian shading
and the orientation loss then shape the geometry).

The renderer talks to a field through three calls, which analytic test fields mimic:
`field(x) -> (sigma, albedo)`, `field.forward_with_normal(x, create_graph) -> (sigma, albedo, normal)`
and `field.density(x)` (occupancy updates).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geometry.hashgrid import HashGridEncoding

DENSITY_ACTIVATIONS = ("softplus", "exp")


@dataclass
class FieldConfig:
    num_levels: int = 12  # hash-grid resolution levels
    features_per_level: int = 2  # features stored per level and vertex
    log2_table_size: int = 17  # log2 of each level's table size (levels that fit are dense)
    base_resolution: int = 16  # cells per axis of the coarsest level
    max_resolution: int = 1024  # cells per axis of the finest level
    hidden_dim: int = 64  # width of the MLP's hidden layers
    num_layers: int = 2  # number of hidden layers of the MLP
    density_activation: str = "softplus"  # "softplus" or "exp": raw density -> sigma (1 / world unit)
    density_bias: float = -3.0  # added to the raw density everywhere: softplus(-3) = 0.05, a clear background
    blob_density: float = 10.0  # raw density added at the origin, falling linearly to 0 at blob_radius
    blob_radius: float = 0.5  # radius of the initial density blob, world units
    bound: float = 1.0  # the field lives in [-bound, bound]^3; zero density outside

    def check(self) -> None:
        for name in ("num_levels", "features_per_level", "base_resolution", "hidden_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(f"density_activation must be one of {DENSITY_ACTIVATIONS}, got {self.density_activation!r}")
        if self.blob_density < 0:
            raise ValueError(f"blob_density must be >= 0, got {self.blob_density}")
        if self.blob_radius <= 0:
            raise ValueError(f"blob_radius must be > 0, got {self.blob_radius}")
        if self.bound <= 0:
            raise ValueError(f"bound must be > 0, got {self.bound}")


class NeRFField(nn.Module):
    """Density [N] and albedo [N, 3] at world points [N, 3], from one hash grid and one small MLP."""

    def __init__(self, config: FieldConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else FieldConfig()
        config.check()
        self.encoding = HashGridEncoding(
            num_levels=config.num_levels,
            features_per_level=config.features_per_level,
            log2_table_size=config.log2_table_size,
            base_resolution=config.base_resolution,
            max_resolution=config.max_resolution,
            bound=config.bound,
        )
        layers: list[nn.Module] = []
        width = self.encoding.output_dim
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU()]
            width = config.hidden_dim
        layers.append(nn.Linear(width, 4))  # raw density, 3 albedo logits
        self.mlp = nn.Sequential(*layers)

    def blob(self, x: Tensor) -> Tensor:  # x: [N, 3] -> [N] raw-density offset
        # sqrt with a floor: the gradient at the origin stays finite.
        radius = (x * x).sum(dim=-1).clamp_min(1e-12).sqrt()
        return self.config.blob_density * (1.0 - radius / self.config.blob_radius).clamp_min(0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x: [N, 3] -> (sigma [N], albedo [N, 3])
        if x.dim() != 2 or x.shape[-1] != 3:
            raise ValueError(f"x must have shape [N, 3], got {list(x.shape)}")
        return self._activate(x, self.mlp(self.encoding(x)))

    def _activate(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """MLP output h [N, 4] -> (sigma [N], albedo [N, 3])."""
        raw = h[:, 0] + self.config.density_bias + self.blob(x)
        if self.config.density_activation == "softplus":
            sigma = F.softplus(raw)
        else:
            sigma = torch.exp(raw.clamp(max=15.0))  # clamp: exp overflows and explodes gradients
        inside = (x.abs() <= self.config.bound).all(dim=-1)
        sigma = torch.where(inside, sigma, torch.zeros_like(sigma))
        return sigma, torch.sigmoid(h[:, 1:4])

    def density(self, x: Tensor) -> Tensor:  # x: [N, 3] -> [N]
        return self(x)[0]

    def albedo(self, x: Tensor) -> Tensor:  # x: [N, 3] -> [N, 3] in [0, 1]
        return self(x)[1]

    def forward_with_normal(self, x: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(sigma [N], albedo [N, 3], normal [N, 3]) with normal = -grad(sigma) / |grad(sigma)| (0 where flat).

        create_graph=True keeps the normals differentiable w.r.t. the parameters (training with
        shading or an orientation loss; costs a double backward); otherwise they are detached.
        Works under torch.no_grad() too.
        """
        grad_enabled = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            sigma, albedo = self(xg)
            (grad,) = torch.autograd.grad(
                sigma.sum(), xg, create_graph=create_graph and grad_enabled, retain_graph=grad_enabled
            )
        normal = -F.normalize(grad, dim=-1, eps=1e-12)  # [N, 3]
        if not (create_graph and grad_enabled):
            normal = normal.detach()
        if not grad_enabled:
            sigma, albedo = sigma.detach(), albedo.detach()
        return sigma, albedo, normal

    def normal(self, x: Tensor, create_graph: bool = False) -> Tensor:  # x: [N, 3] -> [N, 3] unit
        return self.forward_with_normal(x, create_graph=create_graph)[2]

    @torch.no_grad()
    def query(self, x: Tensor, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
        """(sigma [N], albedo [N, 3]) without gradients, `chunk_size` points at a time (mesh extraction, baking)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if x.shape[0] == 0:
            return x.new_zeros(0), x.new_zeros(0, 3)
        parts = [self(x[i : i + chunk_size]) for i in range(0, x.shape[0], chunk_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def parameter_groups(self, lr_encoding: float, lr_network: float) -> list[dict]:
        """Adam parameter groups: the hash table usually wants a larger learning rate than the MLP."""
        return [
            {"params": list(self.encoding.parameters()), "lr": lr_encoding, "name": "encoding"},
            {"params": list(self.mlp.parameters()), "lr": lr_network, "name": "network"},
        ]
