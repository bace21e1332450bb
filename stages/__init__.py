"""The three stages (coarse NeRF, DMTet refine, export) and the pipeline that chains them."""
