"""Synthetic H&E-like images with STAS-like clusters, for tests and the demo.

Each image is pink stroma with scattered dark nuclei; some carry clusters of round, purple, STAS-like cells
whose union is the mask. A fraction of the images has no cluster (empty mask), as real data does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def draw_sample(height: int, width: int, rng: np.random.Generator, empty: bool) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image and its 0/255 mask."""
    base = np.array([236, 190, 210], np.float32) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(height * width // 400):  # scattered nuclei of the background tissue
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(1, 2.5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(120, 60, 140))
    mask = Image.new("L", (width, height), 0)
    mask_draw = ImageDraw.Draw(mask)
    for _ in range(0 if empty else int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        scale = min(height, width) / 10
        for _ in range(int(rng.integers(3, 7))):
            x, y = cx + rng.normal(0, scale * 0.7), cy + rng.normal(0, scale * 0.7)
            r = scale * rng.uniform(0.5, 0.9)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(150, 80, 165), outline=(100, 40, 120))
            mask_draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(image), np.asarray(mask)


def make_dataset(out: str | Path, n: int = 24, height: int = 80, width: int = 96, empty_every: int = 6,
                 seed: int = 0, prefix: str = "case") -> tuple[Path, Path]:
    """Write ``n`` JPEG images and PNG masks into ``out/images`` and ``out/masks``; every ``empty_every``-th
    sample has an empty mask. Returns the two folders."""
    rng = np.random.default_rng(seed)
    images, masks = Path(out) / "images", Path(out) / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = draw_sample(height, width, rng, empty=empty_every > 0 and i % empty_every == 0)
        Image.fromarray(image).save(images / f"{prefix}_{i:03d}.jpg", quality=92)
        Image.fromarray(mask).save(masks / f"{prefix}_{i:03d}.png")
    return images, masks
