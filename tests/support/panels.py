"""Grafana's panels without Grafana, which cannot be installed from this machine's registries:
each target of a Grafana dashboard JSON (docs/grafana/prorch-dashboard.json) is run against a
real Prometheus server's query API, and the results are drawn as one HTML page on Grafana's
grid (24 columns, 30 px a row): time series as SVG lines with a legend, stats as their last
value coloured by the panel's thresholds. A browser screenshots the page."""

from __future__ import annotations

import html
import json
import math
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

PAGE_WIDTH = 1400
ROW_HEIGHT = 30
COLOURS = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#FADE2A"]


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (unix time, value); NaN values are gaps


def substitute(expr: str, rate_interval: str = "5s", job: str = ".*") -> str:
    """Grafana's variables in a query, as Grafana would fill them in for this range."""
    return expr.replace("$__rate_interval", rate_interval).replace("$job", job)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
    """The matrix Prometheus answers for ``expr``; AssertionError with its message when it refuses."""
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    try:
        with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}", timeout=30) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        answer = json.load(error)
    assert answer.get("status") == "success", f"Prometheus refused {expr!r}: {answer.get('error')}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def legend(template: str, metric: dict[str, str]) -> str:
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: metric.get(m[1], ""), template) or json.dumps(metric)


def panel_series(prometheus: str, panel: dict[str, Any], start: float, end: float, **variables: str) -> list[Series]:
    """Every series the panel's targets give over the range."""
    found = []
    for target in panel["targets"]:
        for result in query_range(prometheus, substitute(target["expr"], **variables), start, end):
            points = [(float(t), float(v)) for t, v in result["values"]]
            found.append(Series(legend(target.get("legendFormat", ""), result["metric"]), points))
    return found


def wait_for_data(prometheus: str, expr: str, timeout: float = 60) -> None:
    """Until Prometheus has scraped something that ``expr`` finds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.time()
        try:
            if query_range(prometheus, expr, now - 60, now):
                return
        except (OSError, AssertionError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus found nothing for {expr!r} within {timeout:g}s")


def nice_ceiling(value: float) -> float:
    """The axis top: the next 1, 2, 2.5 or 5 times a power of ten at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def formatted(value: float, unit: str) -> str:
    if math.isnan(value):
        return "No data"
    if value == 0:
        return {"s": "0 s", "ops": "0/s"}.get(unit, "0")
    if unit == "s":
        return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "ops":
        return f"{value:.2f}/s" if abs(value) < 10 else f"{value:.0f}/s"
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 10 else f"{value:.2f}"


def threshold_colour(panel: dict[str, Any], value: float) -> str:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    colour = "#73BF69"
    for step in steps:
        if step["value"] is None or value >= step["value"]:
            colour = {"green": "#73BF69", "orange": "#FF9830", "red": "#F2495C"}.get(step["color"], step["color"])
    return colour


def stat_html(panel: dict[str, Any], series: list[Series]) -> str:
    values = [v for s in series[:1] for _, v in s.points if not math.isnan(v)]
    if not values:
        return '<div class="nodata">No data</div>'
    last = values[-1]
    colour = threshold_colour(panel, last)
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    return f'<div class="stat" style="color:{colour}">{html.escape(formatted(last, unit))}</div>'


def timeseries_svg(
    panel: dict[str, Any], series: list[Series], start: float, end: float, width: int, height: int
) -> str:
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    values = [v for s in series for _, v in s.points if not math.isnan(v)]
    if not values:
        return '<div class="nodata">No data</div>'
    left, bottom, top = 64, 20, 6
    top_value = nice_ceiling(max(values))
    plot_w, plot_h = width - left - 8, height - bottom - top

    def x(t: float) -> float:
        return left + (t - start) / (end - start) * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / top_value * plot_h

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for fraction in (0, 0.5, 1):
        level = top_value * fraction
        parts.append(f'<line x1="{left}" x2="{width - 8}" y1="{y(level):.1f}" y2="{y(level):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y(level) + 4:.1f}" class="axis" text-anchor="end">'
                     f"{html.escape(formatted(level, unit))}</text>")  # fmt: skip
    for fraction in (0, 0.5, 1):
        moment = start + (end - start) * fraction
        anchor = ("start", "middle", "end")[int(fraction * 2)]
        parts.append(f'<text x="{x(moment):.1f}" y="{height - 4}" class="axis" text-anchor="{anchor}">'
                     f"{time.strftime('%H:%M:%S', time.localtime(moment))}</text>")  # fmt: skip
    for index, item in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        runs: list[list[str]] = [[]]
        for t, v in item.points:
            if math.isnan(v):
                runs.append([])
            else:
                runs[-1].append(f"{x(t):.1f},{y(v):.1f}")
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline points="{" ".join(run)}" stroke="{colour}" fill="none" stroke-width="1.5"/>')
    parts.append("</svg>")
    keys = "".join(
        f'<span class="key"><i style="background:{COLOURS[i % len(COLOURS)]}"></i>{html.escape(s.label)}</span>'
        for i, s in enumerate(series)
    )
    return "".join(parts) + f'<div class="legend">{keys}</div>'


def dashboard_html(dashboard: dict[str, Any], data: dict[int, list[Series]], start: float, end: float) -> str:
    """The whole dashboard as one page, each panel where its gridPos puts it."""
    column = PAGE_WIDTH / 24
    cells = []
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        width, height = int(grid["w"] * column) - 8, grid["h"] * ROW_HEIGHT - 8
        series = data[panel["id"]]
        if panel["type"] == "stat":
            body = stat_html(panel, series)
        else:
            legend_rows = 1 + len(series) // 3
            body = timeseries_svg(panel, series, start, end, width - 16, height - 40 - 18 * legend_rows)
        cells.append(
            f'<section class="panel" data-panel="{panel["id"]}" style="left:{grid["x"] * column + 4:.0f}px;'
            f'top:{grid["y"] * ROW_HEIGHT + 4}px;width:{width}px;height:{height}px">'
            f'<h2 title="{html.escape(panel.get("description", ""))}">{html.escape(panel["title"])}</h2>'
            f"{body}</section>"
        )
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"]) * ROW_HEIGHT + 8
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(dashboard["title"])}</title>
<style>
body {{ margin: 0; background: #111217; color: #ccccdc; font: 13px Inter, Helvetica, Arial, sans-serif; }}
header {{ padding: 10px 16px; font-size: 18px; color: #fff; }}
header small {{ color: #8e8e8e; font-size: 12px; margin-left: 12px; }}
main {{ position: relative; width: {PAGE_WIDTH}px; height: {bottom}px; }}
.panel {{ position: absolute; background: #181b1f; border: 1px solid #2c3235; border-radius: 2px;
  padding: 6px 8px; box-sizing: border-box; overflow: hidden; }}
.panel h2 {{ font-size: 13px; font-weight: 500; margin: 0 0 4px; color: #ccccdc; }}
.stat {{ font-size: 34px; font-weight: 500; text-align: center; margin-top: 14px; }}
.nodata {{ color: #8e8e8e; text-align: center; margin-top: 20px; }}
.grid {{ stroke: #2c3235; }} .axis {{ fill: #8e8e8e; font-size: 11px; }}
.legend {{ font-size: 11px; }} .key {{ margin-right: 12px; white-space: nowrap; }}
.key i {{ display: inline-block; width: 12px; height: 3px; margin-right: 4px; vertical-align: middle; }}
</style></head><body>
<header>{html.escape(dashboard["title"])}<small>panels and queries of docs/grafana/prorch-dashboard.json,
from a real Prometheus, {time.strftime("%H:%M:%S", time.localtime(start))} to
{time.strftime("%H:%M:%S", time.localtime(end))}</small></header>
<main>{"".join(cells)}</main></body></html>"""
