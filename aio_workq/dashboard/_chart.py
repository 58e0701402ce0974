"""The throughput chart: a line chart drawn on the server as inline SVG (no JavaScript)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ("Chart", "Series", "line_chart")

WIDTH, HEIGHT = 600, 160
_LEFT, _BOTTOM, _TOP = 48, 22, 8


@dataclass(frozen=True, slots=True)
class Series:
    """One line: its name, CSS class and points as `(seconds ago, value)`."""

    name: str
    css: str
    points: Sequence[tuple[float, float]]


@dataclass(frozen=True, slots=True)
class Chart:
    """What the template draws: each series' `points` attribute and the axis labels."""

    lines: list[tuple[Series, str]]
    top: float
    span: float
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    bottom: int = HEIGHT - _BOTTOM
    summary: str = ""


def line_chart(series: Sequence[Series], *, span: float, unit: str) -> Chart:
    """Scale `series` over the last `span` seconds into the plot area (numbers only: nothing of
    the data reaches the markup but floats)."""
    values = [value for one in series for _, value in one.points]
    top = max([*values, 1.0])
    top = _nice(top)
    plot_w, plot_h = WIDTH - _LEFT - 4, HEIGHT - _BOTTOM - _TOP
    lines = []
    for one in series:
        coords = []
        for ago, value in one.points:
            x = _LEFT + plot_w * (1 - min(max(ago, 0.0), span) / span)
            y = _TOP + plot_h * (1 - max(value, 0.0) / top)
            coords.append(f"{x:.1f},{y:.1f}")
        lines.append((one, " ".join(coords)))
    latest = ", ".join(
        f"{one.name} {one.points[-1][1]:,.1f} {unit}" for one in series if one.points
    )
    summary = f"last {span / 60:g} minutes; now: {latest or 'no samples yet'}"
    return Chart(lines=lines, top=top, span=span, summary=summary)


def _nice(value: float) -> float:
    """The next of 1, 2, 5 x 10^n at or above `value`."""
    scale = 1.0
    while scale * 10 <= value:
        scale *= 10
    for step in (1, 2, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale
