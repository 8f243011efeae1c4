"""Backbones, heads and the self-describing checkpoint format."""

from graftline.models.checkpoint import load_checkpoint, save_checkpoint
from graftline.models.classifier import Classifier, build_backbone, build_classifier

__all__ = ["Classifier", "build_backbone", "build_classifier", "load_checkpoint", "save_checkpoint"]
