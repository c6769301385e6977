"""Point labels of a plotly panel placed clear of its error bars, markers and each other.

Plotly draws a point's text where ``textposition`` says, whatever lies there: three ``k=32``
labels of points a few pixels apart, each centred over its own error bar, overlap the bars and
each other. :func:`place_labels` picks, point by point, the first of :data:`POSITIONS` whose
box (estimated in pixels from the panel's axis ranges and size) meets no bar, marker or label
placed before it, and otherwise the one that overlaps least.
"""

from __future__ import annotations

from collections.abc import Sequence

# Tried in this order: beside the point, off its vertical bar, before above or below it.
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "middle left",
             "middle right", "top center", "bottom center")
CHAR_PX, LINE_PX = 6.8, 14.0  # an 11 px label: width per character, height
MARKER_PX = 5.0  # half a marker's size, and the gap plotly leaves between marker and text
BAR_PX = 2.5  # half the width of a thick error bar


def to_pixels(x: float, y: float, x_range: Sequence[float], y_range: Sequence[float],
              size: Sequence[float]) -> tuple[float, float]:
    """A data point's pixel position in a panel of ``size`` (width, height), y downwards."""
    (x0, x1), (y0, y1), (w, h) = x_range, y_range, size
    return (x - x0) / (x1 - x0) * w, (y1 - y) / (y1 - y0) * h


def label_box(px: float, py: float, text: str, position: str) -> tuple[float, ...]:
    """(left, right, top, bottom) in pixels of ``text`` at ``position`` around a marker."""
    w, h = CHAR_PX * len(text), LINE_PX
    vertical, _, horizontal = position.partition(" ")
    left = {"left": px - MARKER_PX - w, "right": px + MARKER_PX,
            "center": px - w / 2}[horizontal]
    top = {"top": py - MARKER_PX - h, "bottom": py + MARKER_PX,
           "middle": py - h / 2}[vertical]
    return left, left + w, top, top + h


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """The area two (left, right, top, bottom) boxes share."""
    return (max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
            * max(0.0, min(a[3], b[3]) - max(a[2], b[2])))


def place_labels(points: Sequence[tuple[float, float, str]],
                 bars: Sequence[tuple[float, ...]],
                 x_range: Sequence[float], y_range: Sequence[float],
                 size: Sequence[float] = (333.0, 290.0),
                 obstacles: Sequence[tuple[float, ...]] = ()) -> list[str]:
    """A ``textposition`` per point ``(x, y, text)`` (data units) of one panel: clear of the
    vertical ``bars`` ``(x, low, high)`` (or ``(x, low, high, half_width_px)`` for one with
    caps), of every marker, of ``obstacles`` (pixel boxes, e.g.
    a reference marker and its label) and of the labels placed before it; the panel is
    ``size`` pixels wide and high over ``x_range`` and ``y_range``."""
    def px(x, y):
        return to_pixels(x, y, x_range, y_range, size)

    taken = list(obstacles)
    for x, low, high, *half in bars:
        (bx, top), (_, bottom) = px(x, high), px(x, low)
        half = half[0] if half else BAR_PX
        taken.append((bx - half, bx + half, top - 1.0, bottom + 1.0))
    for x, y, _ in points:
        mx, my = px(x, y)
        taken.append((mx - MARKER_PX, mx + MARKER_PX, my - MARKER_PX, my + MARKER_PX))
    chosen = []
    for x, y, text in points:
        mx, my = px(x, y)
        costs = []
        for position in POSITIONS:
            box = label_box(mx, my, text, position)
            outside = (max(0.0, -box[0]) + max(0.0, box[1] - size[0])
                       + max(0.0, -box[2]) + max(0.0, box[3] - size[1])) * LINE_PX
            costs.append(sum(overlap(box, t) for t in taken) + outside)
        best = min(range(len(POSITIONS)), key=lambda i: (costs[i], i))
        chosen.append(POSITIONS[best])
        taken.append(label_box(mx, my, text, POSITIONS[best]))
    return chosen
