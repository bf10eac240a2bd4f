"""argparse ``type=`` functions shared by the stages' command lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def probability_threshold(text: str) -> float:
    """argparse type of a threshold on probabilities: a float in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type of an int >= ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def open_fraction(text: str) -> float:
    """argparse type of a fraction strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type of a float > 0 (a physical size, e.g. microns per pixel)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
