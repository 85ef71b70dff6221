"""Small inline SVG plots: overlaid histograms and stacked bars (no plotting library, no server)."""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np


def _fmt(x: float) -> str:
  return f"{x:.1f}".rstrip("0").rstrip(".")


def nice_step(span: float, target: int) -> float:
  """A 1/2/5 x 10^k step that cuts `span` into about `target` pieces."""
  if span <= 0:
    return 1.0
  raw = span / max(target, 1)
  power = 10 ** math.floor(math.log10(raw))
  for m in (1, 2, 5, 10):
    if m * power >= raw:
      return m * power
  return 10 * power


def integer_edges(max_value: int, target_bins: int = 30) -> np.ndarray:
  """Bin edges 0, w, 2w, ... past max_value with an integer width w (token counts)."""
  width = max(1, int(math.ceil(nice_step(max_value + 1, target_bins))))
  return np.arange(0, max_value + width + 1, width, dtype=np.float64)


def histogram(series: Sequence[tuple[str, np.ndarray, str]], edges: np.ndarray, *, xlabel: str,
              ylabel: str = "rows", width: int = 620, height: int = 200, css_class: str = "plot",
              unit: str = "") -> str:
  """Histograms of already-binned counts (one per series, same edges), overlaid."""
  left, right, top, bottom = 48, 12, 12 + 16 * (len(series) > 1), 36
  plot_w, plot_h = width - left - right, height - top - bottom
  peak = max([int(np.max(c)) if len(c) else 0 for _, c, _ in series] + [1])
  x0, x1 = float(edges[0]), float(edges[-1])
  sx = lambda v: left + (v - x0) / (x1 - x0 or 1) * plot_w  # noqa: E731
  sy = lambda v: top + plot_h - v / peak * plot_h  # noqa: E731
  out = [f'<svg class="{css_class}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
         f'role="img" aria-label="{html.escape(xlabel)} histogram" xmlns="http://www.w3.org/2000/svg">']
  out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>')
  for tick in (0, peak // 2, peak) if peak > 1 else (0, peak):
    y = sy(tick)
    out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" class="grid"/>')
    out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
  step = nice_step(x1 - x0, 6)
  tick = math.ceil(x0 / step) * step
  while tick <= x1 + 1e-9:
    x = sx(tick)
    out.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 4}" class="axis"/>')
    out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_fmt(tick)}</text>')
    tick += step
  out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" class="label">'
             f'{html.escape(xlabel)}</text>')
  out.append(f'<text x="12" y="{top + plot_h / 2:.1f}" text-anchor="middle" class="label" '
             f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">{html.escape(ylabel)}</text>')
  opacity = 0.85 if len(series) == 1 else 0.5
  for name, counts, color in series:
    for i, count in enumerate(counts):
      if not count:
        continue
      xa, xb = sx(edges[i]), sx(edges[i + 1])
      y = sy(count)
      label = f"{name}: {_fmt(edges[i])}–{_fmt(edges[i + 1])}{unit}: {int(count)} {ylabel}"
      out.append(f'<rect x="{xa:.1f}" y="{y:.1f}" width="{max(xb - xa - 1, 0.8):.1f}" '
                 f'height="{top + plot_h - y:.1f}" fill="{color}" fill-opacity="{opacity}">'
                 f'<title>{html.escape(label)}</title></rect>')
  if len(series) > 1:
    x = left
    for name, _, color in series:
      out.append(f'<rect x="{x}" y="2" width="10" height="10" fill="{color}" fill-opacity="0.7"/>')
      out.append(f'<text x="{x + 14}" y="11">{html.escape(name)}</text>')
      x += 24 + 7 * len(name)
  out.append("</svg>")
  return "".join(out)


def stacked_bars(rows: Sequence[tuple[str, Sequence[tuple[str, int, str]]]], *, width: int = 620,
                 bar_height: int = 22) -> str:
  """One horizontal bar per row label, cut into (part, count, color) pieces by share."""
  left, right = 110, 10
  height = len(rows) * (bar_height + 12) + 4
  out = [f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
         'aria-label="finish reasons" xmlns="http://www.w3.org/2000/svg">']
  for r, (label, parts) in enumerate(rows):
    y = 4 + r * (bar_height + 12)
    total = sum(count for _, count, _ in parts) or 1
    out.append(f'<text x="{left - 8}" y="{y + bar_height / 2 + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
    x = float(left)
    for part, count, color in parts:
      w = count / total * (width - left - right)
      if w <= 0:
        continue
      text = f"{part} {count} ({100 * count / total:.1f}%)"
      out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_height}" fill="{color}">'
                 f'<title>{html.escape(text)}</title></rect>')
      if w > 7 * len(text):
        out.append(f'<text x="{x + 6:.1f}" y="{y + bar_height / 2 + 4:.1f}" class="onbar">{html.escape(text)}</text>')
      elif w > 7 * len(part) + 6:
        out.append(f'<text x="{x + 4:.1f}" y="{y + bar_height / 2 + 4:.1f}" class="onbar">{html.escape(part)}</text>')
      x += w
  out.append("</svg>")
  return "".join(out)
