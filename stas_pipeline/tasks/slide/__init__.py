"""Whole-slide tiled segmentation (the kidney-glomeruli recipe): slides read by window, RLE masks."""
