"""Burned-in text for derived images: an ROI legend (name + colour swatch) and a disclaimer.

A colour series is only useful if a reader can tell which outline is which ROI and cannot mistake
the picture for a clinical image, in a viewer that shows nothing but the pixels. So both go into
the pixels, drawn with Pillow's own scalable FreeType font (``ImageFont.load_default(size=...)``,
Pillow >= 10.1): no system font is needed, which keeps the container and CI images free of font
packages and the output identical on every machine.

The text of a series is the same on every slice and every slice of a series has the same size,
so it is rendered ONCE per series (:func:`render_annotation`) into a colour layer and a coverage
mask, and :func:`composite` blends that onto each slice: Pillow runs once per series, not per
image. Text is white with a black stroke and swatches have a black border, which reads on bright
bone and on black air alike without a backing box that would hide anatomy.

Layout: the legend in the top-left corner, flowing into further columns when the image is not tall
enough; the disclaimer centred along the bottom edge, wrapped onto more lines when it is wider than
the image. The font size grows with the image (:func:`font_size_for`) with a floor of
:data:`MIN_FONT_PX`, so text stays legible when a viewer fits a 512-pixel image to its window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

UInt8Array = npt.NDArray[np.uint8]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), in pixels

#: Smallest font size (pixel height of the em square). 10 px is about the smallest the default
#: font stays readable at when a viewer shows the image at its native size.
MIN_FONT_PX = 10

#: Image pixels (along the longer side) per pixel of font size: 16 px text on a 512-pixel image,
#: which a viewer that fits the image to a ~1000-pixel viewport shows ~30 screen pixels high.
PIXELS_PER_FONT_PX = 32

#: Longest part of the image width one legend name may take before it is shortened with "...".
NAME_WIDTH_FRACTION = 0.45

TEXT_RGB = (255, 255, 255)
STROKE_RGB = (0, 0, 0)


def font_size_for(rows: int, columns: int) -> int:
    """The font size for an image of ``rows`` x ``columns`` pixels (see the module docstring)."""
    return max(MIN_FONT_PX, round(max(rows, columns) / PIXELS_PER_FONT_PX))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Annotation:
    """Text and swatches of one series, ready to blend onto each of its slices.

    ``rgb`` ``[row, column, 3]`` is what to show and ``alpha`` ``[row, column]`` (0-255) how much
    of it covers the image (anti-aliased glyph edges are partial); both are cropped to ``box``.
    ``legend_box`` and ``disclaimer_box`` say where each part was drawn (None: not drawn).
    """

    rows: int
    columns: int
    box: Box | None
    rgb: UInt8Array
    alpha: UInt8Array
    legend_box: Box | None
    disclaimer_box: Box | None
    font_size: int

    @cached_property
    def blend_terms(
        self,
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint16], npt.NDArray[np.uint16], npt.NDArray[np.intp], UInt8Array]:
        """``(partly covered pixels, 255 - alpha, rgb * alpha + 127, fully covered pixels, their rgb)``.

        Pixels are flat indices into the image's ``[row * columns + column]``. Computed once per
        series: the legend and disclaimer boxes are far apart, so the box around both is most of
        the image, and touching only its covered pixels is what keeps a 512-slice colour series
        from spending seconds on the text (a pixel with alpha 0 blends to itself). Fully covered
        pixels (swatches, glyph interiors: two thirds of them) blend to the text's own colour, so
        they are assigned, not blended (the same values: ``(x * 0 + c * 255 + 127) // 255 == c``).
        """
        if self.box is None:
            empty = np.zeros(0, dtype=np.intp)
            none = np.zeros((0, 3), dtype=np.uint8)
            return empty, np.zeros((0, 1), dtype=np.uint16), np.zeros((0, 3), dtype=np.uint16), empty, none
        x0, y0, _, _ = self.box
        rows, columns = np.nonzero(self.alpha)
        flat = (rows + y0) * self.columns + (columns + x0)
        alpha = self.alpha[rows, columns].astype(np.uint16)[:, None]
        color = self.rgb[rows, columns]
        opaque = alpha[:, 0] == 255
        partial = ~opaque
        weighted = color[partial].astype(np.uint16) * alpha[partial] + 127
        return flat[partial], 255 - alpha[partial], weighted, flat[opaque], np.ascontiguousarray(color[opaque])


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """``text``, shortened with "..." until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float
) -> list[str]:
    """Words of ``text`` on as few lines as fit ``width``; a word longer than a line gets its own."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _union(a: Box | None, b: Box | None) -> Box | None:
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _clip(box: Box, columns: int, rows: int) -> Box | None:
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], columns), min(box[3], rows)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def render_annotation(
    rows: int,
    columns: int,
    legend: Sequence[tuple[str, tuple[int, int, int]]],
    disclaimer: str,
    font_size: int | None = None,
) -> Annotation:
    """Draw the legend (``(name, RGB)`` per entry, in order) and the disclaimer for one image size.

    An empty ``legend`` draws no legend and an empty (or blank) ``disclaimer`` no disclaimer.
    ``font_size`` overrides :func:`font_size_for`. Whatever does not fit the image is clipped at
    its edge; nothing is drawn outside it.
    """
    if rows <= 0 or columns <= 0:
        raise ValueError(f"image size must be positive, got {rows} x {columns}")
    size = font_size if font_size is not None else font_size_for(rows, columns)
    font = _font(size)
    stroke = max(1, round(size / 12))
    margin = max(2, size // 2)
    line_height = round(size * 1.35)
    color_layer = Image.new("RGB", (columns, rows), (0, 0, 0))
    coverage = Image.new("L", (columns, rows), 0)
    paint = ImageDraw.Draw(color_layer)
    cover = ImageDraw.Draw(coverage)

    def text(xy: tuple[float, float], value: str) -> Box:
        paint.text(xy, value, font=font, fill=TEXT_RGB, stroke_width=stroke, stroke_fill=STROKE_RGB)
        cover.text(xy, value, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
        x0, y0, x1, y1 = paint.textbbox(xy, value, font=font, stroke_width=stroke)
        return (int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1)))

    disclaimer_box: Box | None = None
    disclaimer_top = rows
    lines = _wrap(paint, disclaimer, font, columns - 2 * margin) if disclaimer.strip() else []
    if lines:
        disclaimer_top = rows - margin - len(lines) * line_height
        for index, line in enumerate(lines):
            width = paint.textlength(line, font=font)
            drawn = text(((columns - width) / 2, disclaimer_top + index * line_height), line)
            disclaimer_box = _union(disclaimer_box, drawn)

    legend_box: Box | None = None
    swatch = max(4, round(size * 0.8))
    name_width = max(size, columns * NAME_WIDTH_FRACTION - swatch - size // 2)
    x, y, column_width = margin, margin, 0
    for name, color in legend:
        if y + line_height > disclaimer_top - margin and y > margin:  # this column is full: start the next
            x, y, column_width = x + column_width + margin, margin, 0
        top = y + (line_height - swatch) // 2
        shown = (x, top, x + swatch, top + swatch)
        paint.rectangle(shown, fill=tuple(int(c) for c in color), outline=STROKE_RGB)
        cover.rectangle(shown, fill=255, outline=255)
        label = _fit(paint, name, font, name_width)
        drawn = text((x + swatch + size // 2, y + (line_height - size) / 2), label)
        entry = (x, min(top, drawn[1]), max(drawn[2], x + swatch + 1), max(top + swatch + 1, drawn[3]))
        legend_box = _union(legend_box, entry)
        column_width = max(column_width, entry[2] - x)
        y += line_height

    legend_box = _clip(legend_box, columns, rows) if legend_box else None
    disclaimer_box = _clip(disclaimer_box, columns, rows) if disclaimer_box else None
    box = _union(legend_box, disclaimer_box)
    if box is None:
        empty = np.zeros((0, 0), dtype=np.uint8)
        return Annotation(rows, columns, None, np.zeros((0, 0, 3), dtype=np.uint8), empty, None, None, size)
    x0, y0, x1, y1 = box
    rgb = np.asarray(color_layer, dtype=np.uint8)[y0:y1, x0:x1].copy()
    alpha = np.asarray(coverage, dtype=np.uint8)[y0:y1, x0:x1].copy()
    return Annotation(rows, columns, box, rgb, alpha, legend_box, disclaimer_box, size)


def composite(image: UInt8Array, annotation: Annotation, *, in_place: bool = False) -> UInt8Array:
    """``image`` (``[row, column, 3]`` uint8) with the annotation blended on; a new array, or
    ``image`` itself blended in place with ``in_place`` (a caller's own scratch image).

    Each pixel becomes ``image * (1 - a) + text * a`` with ``a`` the coverage, rounded; pixels
    outside the annotation's box are copied unchanged.
    """
    if image.shape != (annotation.rows, annotation.columns, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"image {image.shape} {image.dtype} does not match the annotation's "
            f"{annotation.rows} x {annotation.columns} x 3 uint8"
        )
    result = image if in_place and image.flags.c_contiguous else np.array(image, order="C")
    partial, keep, weighted, opaque, color = annotation.blend_terms
    pixels = result.reshape(-1, 3)  # a view of the contiguous result
    under = pixels[partial].astype(np.uint16)
    pixels[partial] = ((under * keep + weighted) // 255).astype(np.uint8)
    pixels[opaque] = color
    if in_place and result is not image:
        image[...] = result  # a strided caller's image, blended through a contiguous copy
        return image
    return result


@lru_cache(maxsize=8)
def disclaimer_masks(rows: int, columns: int, disclaimer: str) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Where the disclaimer's letters (``fill``) and their outline (``stroke``) lie on an image of
    ``rows`` x ``columns``, laid out as on the colour series: for burning it into grey pixels,
    where there is no blending, a pixel is text when the glyph covers at least half of it.

    Both are ``[row, column]`` bool, read-only (cached per size and text); empty text gives two
    empty masks.
    """
    fill = np.zeros((rows, columns), dtype=bool)
    stroke = np.zeros((rows, columns), dtype=bool)
    annotation = render_annotation(rows, columns, [], disclaimer)
    if annotation.box is not None:
        x0, y0, x1, y1 = annotation.box
        covered = annotation.alpha >= 128
        bright = annotation.rgb.mean(axis=2) >= 128
        fill[y0:y1, x0:x1] = covered & bright
        stroke[y0:y1, x0:x1] = covered & ~bright
    fill.flags.writeable = False
    stroke.flags.writeable = False
    return fill, stroke
