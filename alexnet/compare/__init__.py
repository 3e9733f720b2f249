"""Comparing runs: the leaderboard, the MLflow UI and learning-curve plots."""
