"""``data_prep/``: the design card's data-preparation commands run the package's stages (``python -m data_prep.X``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def data_prep(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_labelme_to_masks_help_lists_the_stages_options():
    result = data_prep("data_prep.labelme_to_masks", "--help")
    assert result.returncode == 0
    for option in ("--out", "--images", "--labels", "--line-width", "--point-radius", "--overwrite"):
        assert option in result.stdout


def test_labelme_to_masks_converts_a_folder(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "img").mkdir()
    Image.new("RGB", (60, 40), (200, 120, 180)).save(tmp_path / "img" / "case1.jpg", "JPEG")
    square = {"label": "STAS", "points": [[10, 10], [30, 10], [30, 20], [10, 20]], "group_id": None,
              "shape_type": "polygon", "flags": {}}
    (tmp_path / "ann" / "case1.json").write_text(json.dumps(
        {"version": "4.5.6", "flags": {}, "shapes": [square], "imagePath": "case1.jpg", "imageHeight": 40,
         "imageWidth": 60}))
    result = data_prep("data_prep.labelme_to_masks", str(tmp_path / "ann"), "--out", str(tmp_path / "masks"),
                       "--images", str(tmp_path / "img"))
    assert result.returncode == 0, result.stderr
    assert "written 1" in result.stdout
    with Image.open(tmp_path / "masks" / "case1.png") as im:
        mask = np.asarray(im)
    assert im.mode == "L" and mask.shape == (40, 60) and set(np.unique(mask)) == {0, 255}
    assert int((mask == 255).sum()) == 21 * 11 and mask[15, 20] == 255 and mask[5, 5] == 0
