"""The bench's figure: throughput and p99 per system, and open-loop latency vs offered load.

With matplotlib (``pip install matplotlib``; not a dependency of the service)
it is a labelled two-panel bar chart with min–max whiskers. Without it a plain
PNG is still written (bars only, no text, drawn with zlib) so that the three
result files always exist; the report says which one was made.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Curve:
    """One latency percentile of one system against the offered rate (open loop)."""

    label: str
    offered: list[float]
    ms: list[float]


def plot(throughput: list[Bar], p99_ms: list[Bar], path: Path, title: str,
         curves: list[Curve] | None = None) -> str:
    """Write the figure; returns "matplotlib" or "fallback" (which renderer made it)."""
    curves = curves or []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _fallback_png(throughput, p99_ms, path)
        return "fallback"
    if curves:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 5.4))
        styles = {"p50": ":", "p99": "-", "p99.9": "--"}
        for c in curves:
            system, _, pct = c.label.rpartition(" ")
            color = "#3b75af" if system == "reserve" else "#999999"
            ax3.plot(c.offered, c.ms, styles.get(pct, "-"), marker="o", color=color,
                     label=c.label)
        ax3.set_xlabel("offered load, requests per second (open loop)")
        ax3.set_ylabel("latency from the intended send time, ms")
        ax3.set_yscale("log")
        ax3.grid(alpha=0.3)
        ax3.legend(fontsize=8)
        ax3.set_title("open-loop latency vs offered load", fontsize=9)
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, bars, ylabel, color in (
        (ax1, throughput, "requests per second (median, min–max)", "#3b75af"),
        (ax2, p99_ms, "p99 latency, ms (median, min–max)", "#c0504d"),
    ):
        labels = [b.label for b in bars]
        values = [b.value for b in bars]
        errs = [
            [max(0.0, b.value - b.low) for b in bars], [max(0.0, b.high - b.value) for b in bars]
        ]
        xs = list(range(len(bars)))
        ax.bar(xs, values, yerr=errs, capsize=4, color=color)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}", (x, v), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _fallback_png(throughput: list[Bar], p99_ms: list[Bar], path: Path) -> None:
    width, height, pad = 720, 300, 20
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    panels = ((throughput, (59, 117, 175), 0), (p99_ms, (192, 80, 77), width // 2))
    for bars, color, x0 in panels:
        top = max((b.high for b in bars), default=0.0) or 1.0
        slot = (width // 2 - 2 * pad) // max(1, len(bars))
        for i, b in enumerate(bars):
            h = int((height - 2 * pad) * max(0.0, b.value) / top)
            left = x0 + pad + i * slot + slot // 6
            for y in range(height - pad - h, height - pad):
                for x in range(left, left + max(1, slot * 2 // 3)):
                    pixels[y][x] = color
        for x in range(x0 + pad, x0 + width // 2 - pad):
            pixels[height - pad][x] = (0, 0, 0)
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
