"""Cameras: DreamFusion-style random sampling, fixed orbits, rays and projection matrices.

Frames (shared by every renderer of the project):
- World: right-handed, +z up while training; the object lives inside the unit sphere.
- Camera (OpenGL): x right, y up, the camera looks along -z. `c2w` columns are
  (right, up, back, position).
- Images: [B, H, W, C], row 0 is the top. The projection matrix flips y so that a
  rasterizer with nvdiffrast's pixel convention (row i covers NDC y from -1 + 2i/H)
  produces upright images, and `get_rays` shoots the same pixel centres.

Azimuth 0 looks at the object's front from +x; azimuth grows counter-clockwise seen from above.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from renderers.view_words import view_word

VIEW_DISTANCE = 2.8  # world units: the fixed views' camera distance (previews, turntables, held-out views, the primitives prior)
VIEW_FOVY = 45.0  # degrees: their vertical field of view


# What the camera fields left unset (None) take when no guidance model sets them (`CameraConfig.filled`).
UNSET_CAMERA = {"distance_range": (2.4, 3.2), "fovy_range": (40.0, 55.0), "light_jitter": 0.6}


@dataclass
class CameraConfig:
    elevation_range: tuple[float, float] = (-10.0, 90.0)  # degrees above the xy plane
    azimuth_range: tuple[float, float] = (-180.0, 180.0)  # degrees, 0 = front (+x)
    distance_range: tuple[float, float] | None = None  # camera to look-at point, world units; None = the guidance model's, else (2.4, 3.2)
    fovy_range: tuple[float, float] | None = None  # vertical field of view, degrees; None = the guidance model's, else (40, 55)
    uniform_sphere: bool = True  # sample elevation uniformly on the sphere's area, not in angle
    position_jitter: float = 0.05  # std of the noise added to the camera position, world units
    target_jitter: float = 0.05  # std of the noise added to the look-at point, world units
    up_jitter: float = 0.02  # std of the noise added to the up vector
    light_distance_range: tuple[float, float] = (0.8, 1.5)  # light distance, multiples of the camera distance
    light_jitter: float | None = None  # std of the light's offset around the camera direction, world units; None = the guidance model's, else 0.6
    near: float = 0.1  # near clip plane, world units
    far: float = 10.0  # far clip plane, world units

    def filled(self) -> CameraConfig:
        """A copy with the unset (None) fields at their values for a run whose guidance model chose none."""
        unset = {name: value for name, value in UNSET_CAMERA.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self

    def check(self) -> None:
        for name in ("elevation_range", "azimuth_range", "distance_range", "fovy_range", "light_distance_range"):
            if getattr(self, name) is None and name in UNSET_CAMERA:
                continue
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        lo, hi = self.elevation_range
        if lo < -90 or hi > 90:
            raise ValueError(f"elevation_range must lie in [-90, 90] degrees, got {(lo, hi)}")
        if self.distance_range is not None and self.distance_range[0] <= self.near:
            raise ValueError(f"distance_range must start beyond near={self.near}, got {self.distance_range}")
        if self.fovy_range is not None and not (0 < self.fovy_range[0] and self.fovy_range[1] < 180):
            raise ValueError(f"fovy_range must lie in (0, 180) degrees, got {self.fovy_range}")
        for name in ("position_jitter", "target_jitter", "up_jitter", "light_jitter"):
            if getattr(self, name) is None and name in UNSET_CAMERA:
                continue
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


POSE_JITTERS = ("position_jitter", "target_jitter", "up_jitter")  # the camera pose's noise (not the light's)


def scale_pose_jitter(config: CameraConfig, scale: float) -> CameraConfig:
    """A copy of the camera distribution with its pose jitter (position, look-at point, up) times `scale`."""
    if scale == 1.0:
        return config
    return dataclasses.replace(config, **{name: getattr(config, name) * scale for name in POSE_JITTERS})


@dataclass
class Cameras:
    c2w: Tensor  # [B, 4, 4] camera-to-world
    mvp: Tensor  # [B, 4, 4] projection (OpenGL, y flipped: images upright) @ world-to-camera: pos_clip = [x, 1] @ mvp^T
    intrinsics: Tensor  # [B, 3, 3] pixel intrinsics (u right, v down) for (height, width)
    position: Tensor  # [B, 3] camera centre, world
    light_position: Tensor  # [B, 3] point light, world
    elevation: Tensor  # [B] degrees (before jitter)
    azimuth: Tensor  # [B] degrees in (-180, 180] (before jitter)
    distance: Tensor  # [B] world units
    fovy: Tensor  # [B] degrees
    height: int  # image height, px
    width: int  # image width, px
    view_words: list[str] = field(default_factory=list)  # one of renderers.view_words.VIEW_WORDS per camera

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index: slice) -> Cameras:
        """The cameras of a slice of the batch, at the same image size."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)
                                            if f.name not in ("height", "width")})


def projection_matrix(fovy: Tensor, aspect: float, near: float, far: float) -> Tensor:
    """OpenGL perspective projection with y flipped. fovy: [B] degrees -> [B, 4, 4]."""
    f = 1.0 / torch.tan(torch.deg2rad(fovy) / 2)
    proj = torch.zeros(fovy.shape[0], 4, 4, dtype=fovy.dtype, device=fovy.device)
    proj[:, 0, 0] = f / aspect
    proj[:, 1, 1] = -f  # flip: camera +y (up) lands on the top rows
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


def look_at(position: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """Camera-to-world matrices looking from position [B, 3] at target [B, 3] -> [B, 4, 4]."""
    forward = torch.nn.functional.normalize(target - position, dim=-1)
    right = torch.linalg.cross(forward, up, dim=-1)
    # Looking straight up or down makes forward parallel to up: fall back to a fixed right vector.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.zeros_like(right)
    fallback[:, 1] = 1.0
    right = torch.nn.functional.normalize(torch.where(degenerate, fallback, right), dim=-1)
    true_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_cartesian(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """Degrees, degrees, units: [B] each -> positions [B, 3] (+z up, azimuth 0 on +x)."""
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack(
        [distance * torch.cos(el) * torch.cos(az), distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el)],
        dim=-1,
    )


def _assemble(
    elevation: Tensor,  # [B] degrees
    azimuth: Tensor,  # [B] degrees
    distance: Tensor,  # [B]
    fovy: Tensor,  # [B] degrees
    resolution: tuple[int, int],
    position_noise: Tensor,  # [B, 3]
    target_noise: Tensor,  # [B, 3]
    up_noise: Tensor,  # [B, 3]
    light_position: Tensor | None,  # [B, 3] or None = at the camera
    near: float,
    far: float,
) -> Cameras:
    height, width = resolution
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    azimuth = torch.where(azimuth == -180.0, torch.full_like(azimuth, 180.0), azimuth)
    position = spherical_to_cartesian(elevation, azimuth, distance) + position_noise
    up = torch.zeros_like(position)
    up[:, 2] = 1.0
    c2w = look_at(position, target_noise, up + up_noise)
    proj = projection_matrix(fovy, width / height, near, far)
    mvp = proj @ torch.linalg.inv(c2w)
    focal = height / (2.0 * torch.tan(torch.deg2rad(fovy) / 2))
    intrinsics = torch.zeros(elevation.shape[0], 3, 3, dtype=elevation.dtype, device=elevation.device)
    intrinsics[:, 0, 0] = focal
    intrinsics[:, 1, 1] = focal
    intrinsics[:, 0, 2] = width / 2.0
    intrinsics[:, 1, 2] = height / 2.0
    intrinsics[:, 2, 2] = 1.0
    words = [view_word(float(e), float(a)) for e, a in zip(elevation.tolist(), azimuth.tolist())]
    return Cameras(
        c2w=c2w,
        mvp=mvp,
        intrinsics=intrinsics,
        position=position,
        light_position=position.clone() if light_position is None else light_position,
        elevation=elevation,
        azimuth=azimuth,
        distance=distance,
        fovy=fovy,
        height=height,
        width=width,
        view_words=words,
    )


def _check_resolution(resolution: tuple[int, int]) -> None:
    if len(resolution) != 2 or min(resolution) < 1:
        raise ValueError(f"resolution must be (height, width) with both >= 1, got {resolution}")


def sample_cameras(
    batch_size: int,
    config: CameraConfig,
    resolution: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Cameras:
    """Random training cameras as in DreamFusion: random pose, jitter, and a light around the camera."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_resolution(resolution)
    config.check()
    config = config.filled()

    def uniform(lo: float, hi: float, shape=(batch_size,)) -> Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)

    def normal(std: float, shape=(batch_size, 3)) -> Tensor:
        return std * torch.randn(shape, generator=generator, dtype=dtype)

    # 1. Pose on the sphere.
    el_lo, el_hi = config.elevation_range
    if config.uniform_sphere:
        # Uniform over the band's area: sin(elevation) is uniform.
        s = uniform(math.sin(math.radians(el_lo)), math.sin(math.radians(el_hi)))
        elevation = torch.rad2deg(torch.asin(s.clamp(-1.0, 1.0)))
    else:
        elevation = uniform(el_lo, el_hi)
    azimuth = uniform(*config.azimuth_range)
    distance = uniform(*config.distance_range)
    fovy = uniform(*config.fovy_range)
    # 2. Jitter of position, look-at point and up vector.
    position_noise = normal(config.position_jitter)
    target_noise = normal(config.target_jitter)
    up_noise = normal(config.up_jitter)
    # 3. A point light around the camera's direction.
    light_distance = distance * uniform(*config.light_distance_range)
    camera_dir = torch.nn.functional.normalize(spherical_to_cartesian(elevation, azimuth, distance), dim=-1)
    light_dir = torch.nn.functional.normalize(camera_dir + normal(config.light_jitter), dim=-1)
    light_position = light_dir * light_distance[:, None]

    cams = _assemble(
        elevation, azimuth, distance, fovy, resolution, position_noise, target_noise, up_noise,
        light_position, config.near, config.far,
    )
    return _to(cams, device)


def cameras_from_angles(
    elevation: Tensor | list[float],  # [B] degrees
    azimuth: Tensor | list[float],  # [B] degrees
    distance: Tensor | list[float] | float,  # [B] or one value
    fovy: Tensor | list[float] | float,  # [B] or one value, degrees
    resolution: tuple[int, int],
    near: float = 0.1,
    far: float = 10.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Cameras:
    """Exact cameras (no jitter, light at the camera) from angles: previews, held-out views."""
    _check_resolution(resolution)
    elevation = torch.as_tensor(elevation, dtype=dtype).reshape(-1)
    azimuth = torch.as_tensor(azimuth, dtype=dtype).reshape(-1)
    n = max(elevation.shape[0], azimuth.shape[0])
    elevation, azimuth = elevation.expand(n).clone(), azimuth.expand(n).clone()
    distance = torch.as_tensor(distance, dtype=dtype).reshape(-1).expand(n).clone()
    fovy = torch.as_tensor(fovy, dtype=dtype).reshape(-1).expand(n).clone()
    zeros = torch.zeros(n, 3, dtype=dtype)
    cams = _assemble(elevation, azimuth, distance, fovy, resolution, zeros, zeros, zeros, None, near, far)
    return _to(cams, device)


def orbit_cameras(
    num_views: int,
    resolution: tuple[int, int],
    elevation: float = 15.0,  # degrees
    distance: float = VIEW_DISTANCE,  # world units
    fovy: float = VIEW_FOVY,  # degrees
    azimuth_start: float = 0.0,  # degrees of the first view
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Cameras:
    """`num_views` cameras evenly spaced on a circle: previews and turntables."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    azimuth = azimuth_start + torch.arange(num_views, dtype=dtype) * (360.0 / num_views)
    return cameras_from_angles(
        torch.full((num_views,), elevation, dtype=dtype), azimuth, distance, fovy, resolution,
        device=device, dtype=dtype,
    )


def get_rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions through pixel centres: ([B, H, W, 3], [B, H, W, 3])."""
    h, w = cameras.height, cameras.width
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    i, j = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype) + 0.5,
        torch.arange(w, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    fx = cameras.intrinsics[:, 0, 0].view(-1, 1, 1)
    fy = cameras.intrinsics[:, 1, 1].view(-1, 1, 1)
    cx = cameras.intrinsics[:, 0, 2].view(-1, 1, 1)
    cy = cameras.intrinsics[:, 1, 2].view(-1, 1, 1)
    dirs_cam = torch.stack([(j - cx) / fx, -(i - cy) / fy, -torch.ones_like((j - cx) / fx)], dim=-1)  # [B, H, W, 3]
    rot = cameras.c2w[:, :3, :3]  # [B, 3, 3]
    dirs = torch.einsum("bij,bhwj->bhwi", rot, dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def _to(cams: Cameras, device: torch.device | str | None) -> Cameras:
    if device is None:
        return cams
    for name in ("c2w", "mvp", "intrinsics", "position", "light_position", "elevation", "azimuth", "distance", "fovy"):
        setattr(cams, name, getattr(cams, name).to(device))
    return cams


def to_clip(vertices: Tensor, mvp: Tensor) -> Tensor:
    """World vertices [V, 3] (or [B, V, 3]) -> clip-space positions [B, V, 4]."""
    if vertices.dim() == 2:
        vertices = vertices.unsqueeze(0)
    ones = torch.ones_like(vertices[..., :1])
    return torch.cat([vertices, ones], dim=-1) @ mvp.transpose(-1, -2)
