"""Prefect flows: the training pipeline and its scheduled retraining deployment."""
