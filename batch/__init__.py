"""Batch generation on a Ray cluster (`generate.py --prompts FILE --ray`); see batch/ray_runner.py.

Ray is optional: nothing here imports it until a batch runs (batch.ray_runner.import_ray).
"""

__all__: list[str] = []  # the package exports nothing itself: import its modules by name
