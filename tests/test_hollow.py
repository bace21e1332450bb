"""Hollow coarse fields (a shell whose inside SDS never filled) export as one solid: the dip such a
shell leaves in its silhouettes is not carved as an opening, and a hollow that refinement closes off
from every camera is filled even where it was open space at the start."""
import torch
import trimesh

from geometry.dmtet import DMTet, dmtet_from_field
from geometry.level_set import LevelSetSettings, initial_sdf, opacity_level
from geometry.silhouettes import axis_opacity, axis_walls, silhouette_holes
from geometry.tets import make_tet_grid
from geometry.visibility import CameraBand
from stages.config import preset

GRID = preset("quick").refine.grid_resolution
PEAK = 8.0  # a soft coarse field's peak density
BAND = CameraBand((-10.0, 90.0), (-180.0, 180.0), 2.8)  # the primitives prior's training cameras


class ShellField:
    """A soft spherical shell (radius `radius`, walls `wall` thick) with an empty inside."""

    def __init__(self, radius=0.45, wall=0.07):
        self.radius, self.wall = radius, wall

    def query(self, x: torch.Tensor, chunk_size: int = 0):
        r = x.norm(dim=1)
        sigma = PEAK * torch.sigmoid((self.wall / 2 - (r - self.radius).abs()) / 0.015)
        return sigma, self.albedo(x)

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 0.5)


def _one_solid(verts: torch.Tensor, faces: torch.Tensor) -> trimesh.Trimesh:
    mesh = trimesh.Trimesh(verts.detach().numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    return mesh


def test_a_hollow_shell_is_not_carved_as_an_opening():
    field = ShellField()
    verts, _, _, _, level = initial_sdf(field, LevelSetSettings(GRID))
    n = GRID + 1
    density = field.query(verts)[0].view(n, n, n)
    maps = axis_opacity(density, [float(c) for c in (verts.amax(0) - verts.amin(0)) / GRID])
    # Rays through the middle cross two walls and are clearer than those along the rim: without the
    # wall count the dip is carved as if it were a torus's opening, a tunnel through both walls.
    assert silhouette_holes(maps, opacity_level(maps)).any()
    assert not silhouette_holes(maps, opacity_level(maps), axis_walls(density, level)).any()
    dmtet, _ = dmtet_from_field(field, LevelSetSettings(GRID))
    with torch.no_grad():
        mesh = _one_solid(*dmtet.extract())
    assert mesh.euler_number == 2
    assert mesh.volume > 0.9 * 4 / 3 * torch.pi * 0.45**3  # the inside is filled, not a second shell


def test_axis_walls_counts_separate_runs():
    density = torch.zeros(3, 3, 9)
    density[1, 1, [1, 2, 5, 7]] = 1.0  # three runs along z through the middle
    walls = axis_walls(density, 0.5)
    assert int(walls[2][1, 1]) == 3 and int(walls[2][0, 0]) == 0 and int(walls[0][1, 1]) == 1


def test_a_hollow_closed_off_from_the_cameras_is_filled_though_open_at_the_start():
    # A thick shell open below: at the start its inside is seen through a window in the side, so it is
    # open space. Refinement closes the window; the inside still reaches the outside through the opening
    # below, which no camera sees into, so the last fill takes it.
    verts, tets = make_tet_grid(GRID, (-0.6,) * 3, (0.6,) * 3)
    shell = (verts.norm(dim=1) - 0.45).abs() - 0.05  # < 0 in the wall
    shell = torch.where(verts[:, 2] < -0.3, shell.abs() + 0.02, shell)  # no wall below z = -0.3
    window = (verts[:, 2].abs() < 0.15) & (verts[:, 1].abs() < 0.15) & (verts[:, 0] > 0)
    dmtet = DMTet(GRID, verts, tets, torch.where(window, shell.abs() + 0.02, shell), (verts[-1] - verts[0]) / GRID)
    dmtet.cameras = BAND
    centre = int(verts.norm(dim=1).argmin())
    with torch.no_grad():
        assert bool(dmtet.open_space[centre])
        dmtet.solidify()
        assert float(dmtet.signed_distance()[centre]) > 0  # seen through the window: left open
        dmtet.sdf_init.copy_(shell)  # what refinement did: the window is wall again
        assert float(dmtet.signed_distance()[centre]) > 0
        assert dmtet.solidify() > 0
        assert float(dmtet.signed_distance()[centre]) < 0
        mesh = _one_solid(*dmtet.extract())
    assert mesh.euler_number == 2
