"""Geometry: hash-grid encoding, NeRF field, tetrahedral grids, marching tetrahedra, level sets, DMTet, mesh
operations and UV atlases."""

__all__: list[str] = []  # the package exports nothing itself: import its modules by name
