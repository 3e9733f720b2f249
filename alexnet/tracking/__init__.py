"""Tracking: MLflow around `train`. The run lifecycle, what a run records, its checkpoints, the store
and whether a run is alive, its disk use and what the UI shows of it."""
