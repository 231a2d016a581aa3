"""The overview's chart of the last hour, drawn on the server as SVG: no JavaScript library to
vendor, and it renders the same in every browser and in a screenshot."""

from __future__ import annotations

from typing import Any

COLORS = {"finished": "#2e7d32", "failed": "#c62828", "cancelled": "#9e9e9e"}
WIDTH, HEIGHT, PAD = 720, 160, 24


def last_hour_svg(minutes: list[dict[str, int]]) -> str:
    """Stacked bars, one per minute (oldest left): pipelines finished, failed and cancelled."""
    top = max((sum(m.values()) for m in minutes), default=0) or 1
    bar = (WIDTH - 2 * PAD) / max(len(minutes), 1)
    parts: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT + PAD}" role="img" '
        f'aria-label="pipelines ended per minute, last hour" class="chart">',
        f'<line x1="{PAD}" y1="{HEIGHT}" x2="{WIDTH - PAD}" y2="{HEIGHT}" stroke="#bbb"/>',
        f'<text x="{PAD}" y="14" class="axis">{top} / min</text>',
        f'<text x="{PAD}" y="{HEIGHT + 18}" class="axis">60 min ago</text>',
        f'<text x="{WIDTH - PAD}" y="{HEIGHT + 18}" class="axis" text-anchor="end">now</text>',
    ]
    for index, minute in enumerate(minutes):
        y = float(HEIGHT)
        for status in ("finished", "failed", "cancelled"):
            count = minute.get(status, 0)
            if not count:
                continue
            height = (HEIGHT - PAD) * count / top
            y -= height
            x = PAD + index * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" height="{height:.1f}" '
                f'fill="{COLORS[status]}"><title>{count} {status}, {len(minutes) - index} min ago</title></rect>'
            )
    parts.append("</svg>")
    return "".join(parts)


def totals(minutes: list[dict[str, Any]]) -> dict[str, int]:
    return {status: sum(m.get(status, 0) for m in minutes) for status in COLORS}
