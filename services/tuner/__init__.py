"""The tuner service: Optuna studies on policy or on request (see docs/tuner.md)."""
