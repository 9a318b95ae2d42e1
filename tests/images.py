"""Checks on a written PNG: its pixel size, and that it shows something (not one flat colour)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_png_drawn(path: Path, width: int, height: int) -> None:
    """The file is a PNG of ``width`` × ``height`` pixels with marks on it: several colours, some ink."""
    from matplotlib.image import imread

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    img = imread(path)  # (rows, columns, channels), floats in [0, 1]
    assert img.shape[:2] == (height, width), img.shape
    rgb = img[:, :, :3].reshape(-1, 3)
    ink = np.mean(np.any(rgb < 0.9, axis=1))  # fraction of pixels clearly darker than white
    assert 0.01 < ink < 0.9, f"{ink:.3%} of the pixels are drawn"
    assert len(np.unique(np.round(rgb, 2), axis=0)) > 20, "too few colours: a blank or flat image"
