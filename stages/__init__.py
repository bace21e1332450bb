"""The three stages (coarse NeRF, DMTet refine, export) and the pipeline that chains them."""

__all__: list[str] = []  # the package exports nothing itself: import its modules by name
