"""What the core offers the stages' options, as plain data: test-time views, what runs a network in ``stas
predict``, named stain shifts, the ONNX opset. Importable without torch or MONAI, so that a stage builds its
parser (``--help``, usage errors) before it imports them; the modules that implement each (core/trained_runs.py,
core/stain.py, core/exported.py) read them from here.
"""

from __future__ import annotations

import math

_FLIPS = [(), (-1,), (-2,), (-2, -1)]  # the four flips of an image's last two dims
# test-time views: (flipped dims, transposed), done in that order; d4: the four flips, each also transposed
# (the eight symmetries of a square: rotations by 90 degrees and reflections)
TTA_VIEWS = {"none": [((), False)], "h": [((), False), ((-1,), False)], "v": [((), False), ((-2,), False)],
             "hv": [(d, False) for d in _FLIPS], "d4": [(d, t) for t in (False, True) for d in _FLIPS]}
BACKENDS = ("torch", "onnxruntime")  # what runs a run's network in stas predict
ONNX_OPSET = 18

STAIN_SHIFTS: dict[str, tuple[float, float, float]] = {
    "none": (1.0, 1.0, 1.0),
    "darker": (1.25, 1.25, 1.25),
    "lighter": (0.8, 0.8, 0.8),
    "more_h": (1.3, 1.0, 1.0),
    "less_h": (0.7, 1.0, 1.0),
    "more_e": (1.0, 1.3, 1.0),
    "less_e": (1.0, 0.7, 1.0),
    # the public STAS images' mean colour (221/164/206) unmixed against that of 184 other images of the same
    # challenge (212/162/196): more haematoxylin, less eosin, more residue, all at once
    "other_lab": (1.43, 0.8, 1.27),
}


def parse_stain_shift(text: str) -> tuple[float, float, float]:
    """The factors of a name of :data:`STAIN_SHIFTS`, or of ``"h=1.2,e=0.9,d=1"`` (any subset; 1 by default;
    each a number >= 0). ValueError listing the names otherwise."""
    text = text.strip()
    if text in STAIN_SHIFTS:
        return STAIN_SHIFTS[text]
    factors = {"h": 1.0, "e": 1.0, "d": 1.0}
    seen: set[str] = set()
    try:
        for part in text.split(","):
            key, value = (s.strip() for s in part.split("="))
            factor = float(value)
            if key not in factors or key in seen or not 0 <= factor < math.inf:
                raise ValueError(part)
            factors[key] = factor
            seen.add(key)
    except ValueError:
        raise ValueError(f"stain shift {text!r}: expected one of {', '.join(STAIN_SHIFTS)}, or factors on the "
                         "H, E and D concentrations such as 'h=1.2,e=0.9,d=1' (numbers >= 0; 1 when left out)"
                         ) from None
    return factors["h"], factors["e"], factors["d"]
