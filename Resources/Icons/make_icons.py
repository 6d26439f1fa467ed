"""Draw the extension icon, the module icon and the size-colour legend (PNG, with Pillow).

    python Resources/Icons/make_icons.py          # rewrites the PNGs in place

The icon shows a cross-section with three lesions in the size-group colours of
:data:`IWSegmentationLib.core.lesions.SIZE_GROUP_COLORS`: a large one, a medium one and a small
one that is ringed, because finding the small ones is what inverse weighting is for. The
legend uses the same colours, so the panel, the docs and the rendered segments agree
(``Testing/module/test_extension_layout.py`` checks the legend's pixels against the palette).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from IWSegmentationLib.core.lesions import SIZE_GROUP_COLORS, SIZE_GROUPS, SIZE_PRESETS  # noqa: E402

ICON_SIZE = 128
SUPERSAMPLE = 4
EXTENSION_ICON = ROOT / "Resources" / "Icons" / "IWSegmentation.png"
MODULE_ICON = ROOT / "IWSegmentation" / "Resources" / "Icons" / "IWSegmentation.png"
LEGEND = ROOT / "Resources" / "Icons" / "SizeLegend.png"

#: Legend layout: one row per size group; the swatch of row i covers
#: x in [LEGEND_SWATCH_X0, LEGEND_SWATCH_X1), y in [LEGEND_TOP + i * LEGEND_ROW, ... + LEGEND_SWATCH_H).
LEGEND_WIDTH, LEGEND_TOP, LEGEND_ROW = 380, 10, 30
LEGEND_SWATCH_X0, LEGEND_SWATCH_X1, LEGEND_SWATCH_H = 10, 40, 20


def swatch_center(row: int) -> tuple[int, int]:
    """Pixel (x, y) at the centre of the legend swatch of ``row`` (0 small, 1 medium, 2 large)."""
    return ((LEGEND_SWATCH_X0 + LEGEND_SWATCH_X1) // 2, LEGEND_TOP + row * LEGEND_ROW + LEGEND_SWATCH_H // 2)


def draw_icon(size: int = ICON_SIZE) -> Image.Image:
    s = size * SUPERSAMPLE
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)

    def box(cx, cy, r):
        return [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]

    d.rounded_rectangle([0.02 * s, 0.02 * s, 0.98 * s, 0.98 * s], radius=0.18 * s, fill=(28, 32, 40, 255))
    d.ellipse([0.12 * s, 0.2 * s, 0.88 * s, 0.84 * s], fill=(96, 100, 108, 255))  # body section
    d.ellipse([0.2 * s, 0.28 * s, 0.8 * s, 0.76 * s], fill=(132, 136, 142, 255))  # organ
    d.ellipse(box(0.40, 0.50, 0.15), fill=SIZE_GROUP_COLORS["large"] + (255,))
    d.ellipse(box(0.64, 0.40, 0.075), fill=SIZE_GROUP_COLORS["medium"] + (255,))
    d.ellipse(box(0.66, 0.64, 0.035), fill=SIZE_GROUP_COLORS["small"] + (255,))
    d.ellipse(box(0.66, 0.64, 0.085), outline=(255, 255, 255, 255), width=int(0.022 * s))
    return img.resize((size, size), Image.LANCZOS)


def draw_legend(preset: str = "lung") -> Image.Image:
    cut = SIZE_PRESETS[preset]
    labels = {
        "small": f"small   d < {cut.small_mm:g} mm",
        "medium": f"medium  {cut.small_mm:g} ≤ d < {cut.large_mm:g} mm",
        "large": f"large   d ≥ {cut.large_mm:g} mm",
    }
    height = LEGEND_TOP * 2 + LEGEND_ROW * len(SIZE_GROUPS) - (LEGEND_ROW - LEGEND_SWATCH_H)
    img = Image.new("RGB", (LEGEND_WIDTH, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 14)
    except OSError:
        font = ImageFont.load_default()
    for row, group in enumerate(SIZE_GROUPS):
        y = LEGEND_TOP + row * LEGEND_ROW
        d.rectangle([LEGEND_SWATCH_X0, y, LEGEND_SWATCH_X1 - 1, y + LEGEND_SWATCH_H - 1], fill=SIZE_GROUP_COLORS[group])
        d.text((LEGEND_SWATCH_X1 + 10, y + 2), labels[group] + f"  ({preset} preset)", fill=(0, 0, 0), font=font)
    return img


def main() -> int:
    icon = draw_icon()
    for path in (EXTENSION_ICON, MODULE_ICON):
        path.parent.mkdir(parents=True, exist_ok=True)
        icon.save(path, optimize=True)
    draw_legend().save(LEGEND, optimize=True)
    for path in (EXTENSION_ICON, MODULE_ICON, LEGEND):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
