"""STAS segmentation pipeline: data preparation, MONAI bundles, ensembling and submission export."""

__version__ = "0.1.0"
