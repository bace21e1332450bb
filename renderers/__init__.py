"""Cameras and renderers: volume (NeRF) and mesh rasterization."""

__all__: list[str] = []  # the package exports nothing itself: import its modules by name
