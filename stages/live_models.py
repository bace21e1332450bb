"""Intermediate models for the viewer: the shape while it trains, before the textured export exists.

The coarse stage writes its surface when it ends (`preview-coarse.glb`: the field's density level set
by marching tetrahedra on the refine stage's grid, i.e. the surface refinement starts from); the refine
stage writes its current mesh every `refine.model_every` steps (`preview-refine-<step>.glb`). Both carry
vertex colours from the colour field and are Y-up like the export. Each new file replaces the previous
one; the export deletes them all (`clear`), since its textured GLB replaces them.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PREFIX = "preview-"  # intermediate GLBs are "preview-*.glb" in the run folder
COARSE_NAME = "preview-coarse.glb"
COARSE_LABEL = "coarse surface"


def refine_name(step: int) -> str:
    return f"preview-refine-{step}.glb"


def refine_label(step: int) -> str:
    return f"refine step {step} (vertex colours)"


@dataclass
class LiveModels:
    """Where a run's intermediate GLBs go, and how the coarse surface is meshed (the refine stage's settings)."""

    folder: str | os.PathLike  # the run's folder
    grid_resolution: int = 48  # tet grid cells per axis of the coarse surface
    threshold: float | None = None  # density level of the surface; None = automatic
    opacity: float | None = None  # with threshold None: the opacity that outlines the object; None = the field's own
    margin: float = 0.1  # world units around the occupied region
    smoothing: float = 1.0  # Gaussian sigma of the SDF, grid cells

    @classmethod
    def for_run(cls, folder: str | os.PathLike, refine) -> LiveModels:
        """Meshed as the refine stage's DMTet starts (`refine`: a RefineConfig)."""
        return cls(folder, refine.grid_resolution, refine.threshold, refine.surface_opacity, refine.grid_margin,
                   refine.sdf_smoothing)

    def coarse_surface(self, field, device=None) -> str | None:
        """Write the coarse field's surface as COARSE_NAME; its path, or None when the field has no surface."""
        from geometry.level_set import LevelSetSettings, extract_mesh

        settings = LevelSetSettings(self.grid_resolution, self.threshold, self.margin, self.smoothing, self.opacity)
        with torch.no_grad():
            verts, faces = extract_mesh(field, settings, device)
            if faces.shape[0] == 0:
                return None
            colours = field.albedo(verts.to(next(field.parameters()).device))
        return self._write(COARSE_NAME, verts, faces, colours)

    def refine_mesh(self, verts: Tensor, faces: Tensor, color_field, step: int) -> str:
        """Write the refine stage's mesh at `step` (verts [V, 3], faces [F, 3], training frame) and drop older ones."""
        with torch.no_grad():
            colours = color_field.albedo(verts.detach())
        return self._write(refine_name(step), verts, faces, colours)

    def _write(self, name: str, verts: Tensor, faces: Tensor, colours: Tensor) -> str:
        path = Path(self.folder) / name
        write_glb(path, verts.detach().cpu().numpy(), faces.cpu().numpy(), colours.detach().float().cpu().numpy())
        clear(self.folder, keep=name)
        return str(path)


def write_glb(path: str | os.PathLike, verts: np.ndarray, faces: np.ndarray, colours: np.ndarray) -> None:
    """A GLB of a mesh with vertex colours (verts [V, 3] in the +z-up training frame, faces [F, 3], colours
    [V, 3] in [0, 1]), Y-up and smooth-shaded; written whole under a temporary name, then renamed, so a
    viewer never reads half a file."""
    import trimesh

    from stages.export import to_y_up

    rgba = np.concatenate([np.clip(colours, 0, 1) * 255, np.full((len(colours), 1), 255)], axis=1).round()
    mesh = trimesh.Trimesh(to_y_up(verts), faces, vertex_colors=rgba.astype(np.uint8), process=False)
    mesh.vertex_normals  # noqa: B018 (computed now, so that the GLB carries them: smooth shading)
    data = mesh.export(file_type="glb", include_normals=True)
    path = Path(path)
    temp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    temp.write_bytes(data)
    os.replace(temp, path)


def clear(folder: str | os.PathLike, keep: str | None = None) -> None:
    """Delete the intermediate GLBs in `folder` (all, or all but `keep`)."""
    for path in Path(folder).glob(f"{PREFIX}*.glb"):
        if path.name != keep:
            path.unlink(missing_ok=True)
