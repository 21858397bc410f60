"""HTML building blocks of the report: embedded PNG thumbnails, inline SVG charts, value formatting."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

#: Displayed image size in the HTML (small images are enlarged with nearest-neighbour, large ones shrunk).
THUMB = 128


def png_data_uri(image: np.ndarray, size: int = THUMB) -> str:
    """Encode a float image [H, W, 3] in [0, 1] as a base64 PNG data URI, resized to ``size`` px wide."""
    from PIL import Image

    arr = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    h, w = arr.shape[:2]
    resample = Image.NEAREST if w < size else Image.LANCZOS
    img = img.resize((size, max(1, round(h * size / w))), resample)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(image: np.ndarray, alt: str, caption: str | None = None) -> str:
    """An embedded thumbnail, with an optional caption line under it."""
    tag = f'<img src="{png_data_uri(image)}" alt="{html.escape(alt)}" width="{THUMB}">'
    if caption is None:
        return tag
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>"


def layer_chart_svg(layers: list[tuple[str, int, int]], width: int = 720) -> str:
    """Inline SVG bar chart: pruned neurons per value layer; ``layers`` = [(id, pruned, rows)]."""
    bar_h, gap, label_w = 18, 6, 360
    top = max((n for _, n, _ in layers), default=1) or 1
    height = len(layers) * (bar_h + gap) + gap
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="pruned neurons per layer">']
    for k, (lid, n, rows) in enumerate(layers):
        y = gap + k * (bar_h + gap)
        length = (width - label_w - 90) * n / top
        short = lid.removesuffix(".transformer_blocks.0.attn2.to_v")
        parts.append(f'<text x="0" y="{y + bar_h - 4}" font-size="12">{html.escape(short)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" fill="#c0392b"/>')
        parts.append(f'<text x="{label_w + length + 6:.1f}" y="{y + bar_h - 4}" font-size="12">{n} / {rows}</text>')
    parts.append("</svg>")
    return "".join(parts)


def fmt(value, digits: int = 4) -> str:
    """A table cell: floats rounded, None as '-', everything HTML-escaped."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def comparison_chart_svg(title: str, found: float, controls: list[float], limit: float | None = None,
                         width: int = 560) -> str:
    """Inline SVG bars: the found set (red) against each random control (grey), with an optional limit line."""
    bar_h, gap, label_w = 16, 4, 110
    values = [found, *controls]
    labels = ["found set", *(f"control {i + 1}" for i in range(len(controls)))]
    top = max([abs(v) for v in values] + ([abs(limit)] if limit is not None else []) + [1e-9])
    scale = (width - label_w - 70) / top
    height = 22 + len(values) * (bar_h + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}"><text x="0" y="14" font-size="13" font-weight="bold">'
             f'{html.escape(title)}</text>']
    for k, (label, v) in enumerate(zip(labels, values)):
        y = 22 + k * (bar_h + gap)
        color = "#c0392b" if k == 0 else "#95a5a6"
        length = max(1.0, abs(v) * scale)
        parts.append(f'<text x="0" y="{y + bar_h - 3}" font-size="12">{label}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" fill="{color}"/>')
        parts.append(f'<text x="{label_w + length + 4:.1f}" y="{y + bar_h - 3}" font-size="12">{v:.4f}</text>')
    if limit is not None:
        x = label_w + abs(limit) * scale
        parts.append(f'<line x1="{x:.1f}" y1="18" x2="{x:.1f}" y2="{height}" stroke="#000" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)
