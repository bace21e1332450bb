"""Cameras and renderers: volume (NeRF) and mesh rasterization."""
