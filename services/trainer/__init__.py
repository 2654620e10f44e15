"""The trainer service: retrain on every data.updated, warm-started and gated."""
