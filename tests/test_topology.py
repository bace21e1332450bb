"""A torus-shaped coarse field gives a genus-1 mesh at the refine stage's `quick` grid, even when
the field leaves a film across the opening (what coarse NeRFs of tori tend to do)."""
import torch
import trimesh

from geometry.dmtet import dmtet_from_field
from geometry.level_set import LevelSetSettings, density_to_sdf, extract_mesh, initial_sdf, opacity_level
from geometry.silhouettes import axis_opacity
from geometry.tets import marching_tets
from stages.config import preset

MAJOR, MINOR, PEAK = 0.4, 0.15, 8.0  # the primitives prior's torus; a soft coarse field's peak density


def silhouette_holes(density, cell):  # with the object's opacity read off the maps, as initial_sdf does
    from geometry.silhouettes import silhouette_holes as holes

    maps = axis_opacity(density, cell)
    return holes(maps, opacity_level(maps))


class TorusField:
    """Density of a soft solid torus around z (sigmoid across its surface), plus optionally a film
    across its opening: a disk of `film` x PEAK density, 0.06 thick, filling r < MAJOR."""

    def __init__(self, film: float = 0.0):
        self.film = film

    def query(self, x: torch.Tensor, chunk_size: int = 0):  # [N, 3] -> sigma [N], albedo [N, 3]
        tube = torch.sqrt((torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2) - MAJOR) ** 2 + x[:, 2] ** 2)
        sigma = PEAK * torch.sigmoid((MINOR - tube) / 0.02)
        if self.film:
            disk = (x[:, 2].abs() < 0.03) & (torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2) < MAJOR)
            sigma = torch.maximum(sigma, self.film * PEAK * disk.to(sigma.dtype))
        return sigma, self.albedo(x)

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 0.5)


def _euler(verts: torch.Tensor, faces: torch.Tensor) -> int:
    mesh = trimesh.Trimesh(verts.detach().numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    return int(mesh.euler_number)


GRID = preset("quick").refine.grid_resolution  # 48


def test_torus_field_gives_genus_one_start_mesh():
    dmtet, _ = dmtet_from_field(TorusField(), LevelSetSettings(GRID))
    with torch.no_grad():
        assert _euler(*dmtet.extract()) == 0


def test_film_across_the_opening_is_carved():
    field = TorusField(film=0.8)
    # The film is above the surface level: a plain level set closes the opening (genus 0) ...
    verts, tets, _, _, level = initial_sdf(field, LevelSetSettings(GRID))
    density = field.query(verts)[0].view(GRID + 1, GRID + 1, GRID + 1)
    assert float(density.max()) * 0.8 > level
    assert _euler(*marching_tets(verts, tets, density_to_sdf(density, level).reshape(-1))) == 2
    # ... but seen from above, rays cross the film mostly unblocked: a hole in the silhouette.
    holes = silhouette_holes(density, [float(c) for c in (verts.amax(0) - verts.amin(0)) / GRID])
    assert holes[GRID // 2, GRID // 2, :].all()  # the axis through the opening
    r = torch.sqrt(verts[:, 0] ** 2 + verts[:, 1] ** 2)
    depth = (MINOR - torch.sqrt((r - MAJOR) ** 2 + verts[:, 2] ** 2)).view_as(density)  # > 0 inside the tube
    assert float(depth[holes].max()) < 0.01  # the tube is never cut, its inner rim at most grazed

    dmtet, _ = dmtet_from_field(field, LevelSetSettings(GRID))
    with torch.no_grad():
        assert _euler(*dmtet.extract()) == 0
    assert _euler(*extract_mesh(field, LevelSetSettings(GRID))) == 0  # the coarse-only export agrees


def test_no_holes_in_solid_shapes():
    ball = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 33)] * 3, indexing="ij"), -1).norm(dim=-1)
    density = PEAK * torch.sigmoid((0.6 - ball) / 0.05)
    assert not silhouette_holes(density, [2 / 32] * 3).any()
    cube = PEAK * ((torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 33)] * 3, indexing="ij"), -1).abs().amax(-1)) < 0.5)
    cube[16, 16, 16] = 0.0  # a one-voxel gap inside is not an opening
    cube[14:19, 14:19, :] *= 0.02  # but a 5 x 5 shaft through it is
    holes = silhouette_holes(cube.float(), [2 / 32] * 3)
    assert holes[14:19, 14:19].all() and int(holes.sum()) == 25 * 33  # exactly the shaft's rays along z


def test_film_more_opaque_than_the_surface_level_is_carved():
    """A film that stops most of the light (opacity 0.76, above the field's surface opacity) still
    leaves a basin in the view from above, walled in by the ring: its floor is carved."""
    field = TorusField(film=3.0)
    verts, _, _, _, level = initial_sdf(field, LevelSetSettings(GRID))
    density = field.query(verts)[0].view(GRID + 1, GRID + 1, GRID + 1)
    maps = axis_opacity(density, [float(c) for c in (verts.amax(0) - verts.amin(0)) / GRID])
    film_opacity = float(maps[2][GRID // 2, GRID // 2])
    assert opacity_level(maps) < film_opacity < 0.9  # no clear ray through the opening
    holes = silhouette_holes(density, [float(c) for c in (verts.amax(0) - verts.amin(0)) / GRID])
    assert holes[GRID // 2, GRID // 2, :].all()
    r = torch.sqrt(verts[:, 0] ** 2 + verts[:, 1] ** 2)
    depth = (MINOR - torch.sqrt((r - MAJOR) ** 2 + verts[:, 2] ** 2)).view_as(density)
    assert float(depth[holes].max()) < 0.01
    with torch.no_grad():
        assert _euler(*dmtet_from_field(field, LevelSetSettings(GRID))[0].extract()) == 0


def test_basins_are_filled_to_their_rim():
    from geometry.silhouettes import filled_basins

    values = torch.zeros(20, 20, dtype=torch.float64)
    values[4:16, 4:16] = 0.9
    values[8:12, 8:12] = 0.6  # a basin walled in at 0.9
    values[4:8, 0:4] = 0.5  # a dip open to the border drains: not a basin
    filled = torch.from_numpy(filled_basins(values.numpy()))
    assert torch.allclose(filled[8:12, 8:12], torch.tensor(0.9, dtype=torch.float64))
    assert torch.equal(filled[:, :4], values[:, :4]) and bool((filled >= values).all())
