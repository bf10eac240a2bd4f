"""Whole-slide tiled segmentation (the kidney-glomeruli recipe): tiles over tissue, stitched windows, RLE."""

from __future__ import annotations

from stas_pipeline.tasks.segmentation.task import SegmentationTask


class SlideTask(SegmentationTask):
    name = "slide"
    description = "masks of whole slides (tiles over tissue; stitched windows; Dice at every threshold; RLE)"
    refines = ("segmentation",)
    datalist_options = ()  # its datalist is written by stas tile
    predict_options = ("slides",)
    evaluate_options = ("slides",)
