"""The benchmark's chart, with no plotting library: grouped bars (direct vs gateway) per panel, as PNG and SVG.

The PNG is drawn on an RGB byte canvas with a 5x7 bitmap font and written with zlib + struct.
"""
from __future__ import annotations

import struct
import zlib
from html import escape

DIRECT = (76, 120, 168)
GATEWAY = (245, 133, 24)
INK = (40, 40, 40)
GRID = (225, 225, 225)
WHITE = (255, 255, 255)

_GLYPHS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100", ":": "00000 01100 01100 00000 01100 01100 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000", "/": "00001 00010 00010 00100 01000 01000 10000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    ",": "00000 00000 00000 00000 01100 00100 01000", "=": "00000 00000 11111 00000 11111 00000 00000",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(bytes(WHITE) * width * height)

    def rect(self, x: int, y: int, w: int, h: int, color: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.w, x + w), min(self.h, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            start = (yy * self.w + x0) * 3
            self.px[start:start + len(row)] = row

    def text(self, x: int, y: int, s: str, scale: int = 1, color: tuple[int, int, int] = INK) -> None:
        for ch in s.upper():
            rows = _GLYPHS.get(ch, _GLYPHS[" "]).split()
            for r, bits in enumerate(rows):
                for c, bit in enumerate(bits):
                    if bit == "1":
                        self.rect(x + c * scale, y + r * scale, scale, scale, color)
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def text_width(s: str, scale: int = 1) -> int:
    return 6 * scale * len(s) - scale


def fmt(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _layout(panels: list[dict], width: int, height: int):
    """Bars as (panel index, x, y, w, h, color, value) and the panel frames, shared by PNG and SVG."""
    left, top, bottom = 20, 70, 40
    pw = (width - left) // len(panels)
    frames, bars = [], []
    for i, panel in enumerate(panels):
        x0 = left + i * pw
        plot_h = height - top - bottom
        peak = max([v for g in panel["groups"] for v in (g["direct"], g["gateway"]) if v is not None] or [1]) or 1
        frames.append((x0, top, pw - 20, plot_h, panel["title"]))
        gw = (pw - 40) // len(panel["groups"])
        bw = max(6, (gw - 12) // 2)
        for j, group in enumerate(panel["groups"]):
            gx = x0 + 10 + j * gw
            for k, (name, color) in enumerate((("direct", DIRECT), ("gateway", GATEWAY))):
                value = group[name]
                if value is None:
                    continue
                bh = max(1, int(plot_h * 0.85 * value / peak))
                bars.append((gx + k * bw, top + plot_h - bh, bw - 2, bh, color, value, group["label"], gx, gw))
    return frames, bars


def draw(panels: list[dict], title: str, png_path: str, svg_path: str, width: int = 1200, height: int = 420) -> None:
    """panels: [{"title": "1 CONN", "groups": [{"label": "P50", "direct": ms, "gateway": ms}, ...]}, ...]."""
    frames, bars = _layout(panels, width, height)
    c = Canvas(width, height)
    c.text(20, 12, title, 2)
    c.rect(20, 40, 12, 12, DIRECT)
    c.text(38, 43, "DIRECT")
    c.rect(100, 40, 12, 12, GATEWAY)
    c.text(118, 43, "GATEWAY")
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="20" y="28" font-size="18">{escape(title)}</text>',
           '<rect x="20" y="40" width="12" height="12" fill="rgb(76,120,168)"/><text x="38" y="51" font-size="12">'
           'direct</text><rect x="100" y="40" width="12" height="12" fill="rgb(245,133,24)"/>'
           '<text x="118" y="51" font-size="12">gateway</text>']
    for x, y, w, h, name in frames:
        c.rect(x, y + h, w, 1, INK)
        c.text(x + (w - text_width(name)) // 2, y + h + 22, name)
        svg.append(f'<line x1="{x}" y1="{y + h}" x2="{x + w}" y2="{y + h}" stroke="black"/>'
                   f'<text x="{x + w // 2}" y="{y + h + 32}" font-size="13" text-anchor="middle">{escape(name)}</text>')
    labelled = set()
    for x, y, w, h, color, value, label, gx, gw in bars:
        c.rect(x, y, w, h, color)
        text = fmt(value)
        c.text(x + (w - text_width(text)) // 2, y - 10, text, color=color)
        rgb = f"rgb({color[0]},{color[1]},{color[2]})"
        svg.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{rgb}"/>'
                   f'<text x="{x + w / 2}" y="{y - 3}" font-size="10" text-anchor="middle">{text}</text>')
        if (gx, label) not in labelled:
            labelled.add((gx, label))
            base = height - 40
            c.text(gx + (gw - 12 - text_width(label)) // 2, base + 6, label)
            svg.append(f'<text x="{gx + (gw - 12) / 2}" y="{base + 14}" font-size="11" '
                       f'text-anchor="middle">{escape(label)}</text>')
    svg.append("</svg>")
    with open(png_path, "wb") as f:
        f.write(c.png())
    with open(svg_path, "w") as f:
        f.write("\n".join(svg) + "\n")
