"""Datasets: sources, validation, transforms, splits and the processed-data store."""

from graftline.data.dataset import Dataset

__all__ = ["Dataset"]
