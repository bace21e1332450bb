"""Geometry: hash-grid encoding, NeRF field, tetrahedral grids, marching tetrahedra and DMTet."""
