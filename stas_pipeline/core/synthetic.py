"""Synthetic H&E-like images with STAS-like clusters, for tests and the demo.

Each image is pink stroma with scattered dark nuclei; some carry clusters of round, purple, STAS-like cells
whose union is the mask. A fraction of the images has no cluster (empty mask), as real data does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def stroma(height: int, width: int, rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """Pink H&E-like stroma with scattered dark nuclei, and a drawing context on it."""
    base = np.array([236, 190, 210], np.float32) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(height * width // 400):  # scattered nuclei of the background tissue
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(1, 2.5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(120, 60, 140))
    return image, draw


def draw_sample(height: int, width: int, rng: np.random.Generator, empty: bool) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image and its 0/255 mask."""
    image, draw = stroma(height, width, rng)
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


# --- the challenge layout: JPEGs and LabelMe annotations drawn from one shape list ---------------------------

CLUSTER_FILL, CLUSTER_OUTLINE, CLUSTER_NUCLEUS = (150, 80, 165), (100, 40, 120), (95, 35, 115)


def _r2(v: float) -> float:
    return round(float(v), 2)


def random_shapes(height: int, width: int, rng: np.random.Generator, n_clusters: int) -> list[dict]:
    """LabelMe shapes (``label`` STAS) of ``n_clusters`` STAS-like clusters; the kinds rotate through
    ``circle`` cells (centre and rim point), a ``polygon`` outline of a solid cluster and a ``rectangle``
    clump, so that any few images hold every kind. Coordinates are rounded to 0.01 px, as files store them."""
    scale = min(height, width) / 10
    shapes = []
    kinds = ("circle", "polygon", "circle", "rectangle")
    first = int(rng.integers(len(kinds)))
    for c in range(n_clusters):
        kind = kinds[(first + c) % len(kinds)]
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        if kind == "circle":
            for _ in range(int(rng.integers(3, 7))):
                r = scale * rng.uniform(0.5, 0.9)
                x = float(np.clip(cx + rng.normal(0, scale * 0.7), r, width - 1 - r))
                y = float(np.clip(cy + rng.normal(0, scale * 0.7), r, height - 1 - r))
                shapes.append({"points": [[_r2(x), _r2(y)], [_r2(x + r), _r2(y)]], "shape_type": "circle"})
        elif kind == "polygon":
            n = int(rng.integers(10, 17))
            radius = scale * rng.uniform(1.1, 1.8)
            angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.15, 0.15, n)
            radii = radius * rng.uniform(0.7, 1.1, n)
            points = [[_r2(np.clip(cx + r * np.cos(a), 0, width - 1)), _r2(np.clip(cy + r * np.sin(a), 0, height - 1))]
                      for a, r in zip(angles, radii, strict=True)]
            shapes.append({"points": points, "shape_type": "polygon"})
        else:
            w, h = scale * rng.uniform(1.2, 2.2), scale * rng.uniform(1.0, 1.8)
            x0, y0 = float(np.clip(cx - w / 2, 0, width - 1 - w)), float(np.clip(cy - h / 2, 0, height - 1 - h))
            shapes.append({"points": [[_r2(x0), _r2(y0)], [_r2(x0 + w), _r2(y0 + h)]], "shape_type": "rectangle"})
    return [{"label": "STAS", "points": s["points"], "group_id": None, "shape_type": s["shape_type"], "flags": {}}
            for s in shapes]


def _shape_box(shape: dict) -> tuple[str, list]:
    """What PIL draws for a shape, exactly as LabelMe's shape_to_mask does: (kind, xy)."""
    kind, pts = shape["shape_type"], [tuple(p) for p in shape["points"]]
    if kind == "circle":
        (cx, cy), (px, py) = pts
        r = float(np.hypot(cx - px, cy - py))
        return "ellipse", [cx - r, cy - r, cx + r, cy + r]
    if kind == "rectangle":
        (x0, y0), (x1, y1) = pts
        return "rectangle", [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
    return "polygon", pts


def draw_shapes_sample(height: int, width: int, rng: np.random.Generator,
                       shapes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB uint8 image whose STAS-like clusters are ``shapes``, and the 0/255 mask of their union
    (drawn as LabelMe draws them, so that converting the annotation gives this mask)."""
    image, draw = stroma(height, width, rng)
    mask = Image.new("L", (width, height), 0)
    mask_draw = ImageDraw.Draw(mask)
    for shape in shapes:
        kind, xy = _shape_box(shape)
        getattr(draw, kind)(xy, fill=CLUSTER_FILL, outline=CLUSTER_OUTLINE)
        getattr(mask_draw, kind)(xy, fill=255, outline=255)
        if kind != "ellipse":  # a solid cluster: darker nuclei inside its outline
            region = Image.new("L", (width, height), 0)
            getattr(ImageDraw.Draw(region), kind)(xy, fill=255)
            ys, xs = np.nonzero(np.asarray(region))
            for j in rng.choice(len(xs), size=min(len(xs), max(3, len(xs) // 60)), replace=False) if len(xs) else []:
                r = rng.uniform(1.2, 2.2)
                draw.ellipse((xs[j] - r, ys[j] - r, xs[j] + r, ys[j] + r), fill=CLUSTER_NUCLEUS)
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(image), np.asarray(mask)


def make_challenge_dataset(out: str | Path, n: int = 40, height: int = 176, width: int = 320, empty_every: int = 6,
                           seed: int = 0, prefix: str = "synthetic",
                           masks: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``n`` images in the challenge's layout: ``out/Train_Images/<name>.jpg`` and
    ``out/Train_Annotations/<name>.json`` (LabelMe: ``shapes`` of label ``STAS`` as ``circle``, ``polygon``
    and ``rectangle``, ``imagePath``, ``imageHeight``, ``imageWidth``); every ``empty_every``-th image has
    ``shapes: []``. With ``masks`` the drawn 0/255 masks are written there too (``<name>.png``), for checking
    a conversion. Returns the image and annotation folders."""
    rng = np.random.default_rng(seed)
    images, annotations = Path(out) / "Train_Images", Path(out) / "Train_Annotations"
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        Path(masks).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        empty = empty_every > 0 and i % empty_every == 0
        shapes = [] if empty else random_shapes(height, width, rng, int(rng.integers(1, 4)))
        image, mask = draw_shapes_sample(height, width, rng, shapes)
        name = f"{prefix}_{i:03d}"
        Image.fromarray(image).save(images / f"{name}.jpg", quality=92)
        document = {"version": "5.0.1", "flags": {}, "shapes": shapes, "imagePath": f"{name}.jpg",
                    "imageData": None, "imageHeight": height, "imageWidth": width}
        (annotations / f"{name}.json").write_text(json.dumps(document, indent=1))
        if masks is not None:
            Image.fromarray(mask).save(Path(masks) / f"{name}.png")
    return images, annotations


# --- fundus-like photographs for the classification task ------------------------------------------------------


def draw_fundus(size: int, rng: np.random.Generator, cup_to_disc: float) -> np.ndarray:
    """A fundus-like RGB photograph: an orange retina on a black border (off-centre, as a camera frames it),
    dark vessels, and a bright optic disc whose pale cup covers ``cup_to_disc`` of its radius (a large cup is
    what glaucoma looks like)."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    cx, cy = size / 2 + rng.normal(0, size * 0.03), size / 2 + rng.normal(0, size * 0.03)
    r = size * rng.uniform(0.36, 0.44)
    tint = rng.normal(0, 12, 3)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in np.clip([200, 90, 40] + tint, 0, 255)))
    dx, dy = cx + r * rng.uniform(0.2, 0.45) * rng.choice([-1, 1]), cy + rng.normal(0, r * 0.08)
    for _ in range(int(rng.integers(5, 9))):  # vessels leaving the disc
        angle, points = rng.uniform(0, 2 * np.pi), [(dx, dy)]
        for _ in range(6):
            angle += rng.normal(0, 0.3)
            x, y = points[-1]
            points.append((x + np.cos(angle) * r * 0.18, y + np.sin(angle) * r * 0.18))
        draw.line(points, fill=(120, 30, 20), width=max(1, int(size / 90)))
    disc = r * rng.uniform(0.26, 0.32)
    draw.ellipse((dx - disc, dy - disc, dx + disc, dy + disc), fill=(245, 190, 120))
    cup = disc * cup_to_disc
    draw.ellipse((dx - cup, dy - cup, dx + cup, dy + cup), fill=(252, 240, 205))
    image = image.filter(ImageFilter.GaussianBlur(size / 250))
    noise = rng.normal(0, 4, (size, size, 3)) * (np.asarray(image).max(axis=2, keepdims=True) > 10)
    return np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)


def make_fundus_dataset(out: str | Path, n: int = 80, size: int = 128, positive_fraction: float = 0.4,
                        seed: int = 0) -> Path:
    """Write ``n`` fundus-like JPEGs into ``out/images`` and ``out/labels.csv`` (``image,label,group``: label 1
    = glaucoma-like, a cup-to-disc ratio drawn from 0.55-0.85 against 0.25-0.55 for label 0; group = a made-up
    patient id shared by two images). Returns the CSV's path."""
    rng = np.random.default_rng(seed)
    images = Path(out) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, label = ["image,label,group"], 0
    for i in range(n):
        if i % 2 == 0:  # the two images of a patient share the label
            label = int(rng.random() < positive_fraction)
        ratio = rng.uniform(0.55, 0.85) if label else rng.uniform(0.25, 0.55)
        Image.fromarray(draw_fundus(size, rng, ratio)).save(images / f"fundus_{i:03d}.jpg", quality=92)
        rows.append(f"images/fundus_{i:03d}.jpg,{label},patient{i // 2:03d}")
    csv_path = Path(out) / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def make_graded_fundus_dataset(out: str | Path, n: int = 100, size: int = 128, seed: int = 0) -> Path:
    """Write ``n`` fundus-like JPEGs into ``out/images`` and ``out/labels.csv`` (``image,label,group``) with an
    ordinal grade 0-4: the cup-to-disc ratio grows with the grade (0.25 + 0.12 x grade + U(0, 0.12), so
    neighbouring grades overlap a little), grades drawn 40/20/20/12/8 % as a clinic's mix is skewed; group = a
    made-up patient id shared by two images of one grade. Returns the CSV's path."""
    rng = np.random.default_rng(seed)
    images = Path(out) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, grade = ["image,label,group"], 0
    for i in range(n):
        if i % 2 == 0:
            grade = int(rng.choice(5, p=[0.4, 0.2, 0.2, 0.12, 0.08]))
        ratio = 0.25 + 0.12 * grade + rng.uniform(0, 0.12)
        Image.fromarray(draw_fundus(size, rng, ratio)).save(images / f"fundus_{i:03d}.jpg", quality=92)
        rows.append(f"images/fundus_{i:03d}.jpg,{grade},patient{i // 2:03d}")
    csv_path = Path(out) / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path
