"""Serving the champion: the MLflow pyfunc model, the HTTP app and batch prediction."""
