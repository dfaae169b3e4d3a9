"""Datasets: synthetic shapes, real GQA, the paper's question subsets, and box-to-patch mapping."""

from mmlens.data.example import TASKS, Box, Example

__all__ = ["TASKS", "Box", "Example"]
