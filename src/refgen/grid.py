"""A labelled image grid: rows are alphas, columns are seeds (the POC's layout)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def make_grid(images: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
              pad: int = 4) -> Image.Image:
    rows, cols = len(images), len(images[0])
    if len(row_labels) != rows or len(col_labels) != cols or any(len(r) != cols for r in images):
        raise ValueError(f"grid is {rows}x{cols} but got {len(row_labels)} row and {len(col_labels)} column labels")
    w, h = images[0][0].size
    font = ImageFont.load_default()
    left = max(48, 7 * max(len(s) for s in row_labels) + 2 * pad)
    top = 16 + pad
    grid = Image.new("RGB", (left + cols * (w + pad), top + rows * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lab in enumerate(col_labels):
        draw.text((left + j * (w + pad) + 2, 2), lab, fill="black", font=font)
    for i, lab in enumerate(row_labels):
        draw.text((2, top + i * (h + pad) + h // 2 - 6), lab, fill="black", font=font)
        for j in range(cols):
            grid.paste(images[i][j].convert("RGB"), (left + j * (w + pad), top + i * (h + pad)))
    return grid
