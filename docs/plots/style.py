"""matplotlib, set up once for every figure: sizes readable at a page's width, a font that
has the CJK glyphs when the system has one, and the boxes and arrows of the diagrams."""

import functools
import sys
import warnings
from pathlib import Path

# Every figure is drawn at this width and dpi, so that its fonts keep their size when a page
# shows it about 900 pixels wide: 9 inches at 100 dpi.
PAGE_WIDTH, DPI = 9.0, 100
# Fonts with Chinese, Japanese and Korean glyphs, in order of preference (Debian: fonts-noto-cjk).
CJK_FONTS = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit('make_figures.py needs matplotlib: pip install -e ".[docs]"')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 9,
        }
    )
    cjk = cjk_font()
    if cjk:  # DejaVu Sans first (its Latin glyphs), the CJK font for what DejaVu lacks
        plt.rcParams["font.family"] = ["DejaVu Sans", cjk]
    return plt


@functools.cache
def cjk_font() -> str | None:
    """The name of an installed font with CJK glyphs, or None (with a warning, once)."""
    from matplotlib import font_manager

    for attempt in range(2):
        installed = {f.name for f in font_manager.fontManager.ttflist}
        for name in CJK_FONTS:
            if name in installed:
                return name
        if attempt == 0:  # matplotlib's font list is cached: add CJK fonts installed since it was made
            for path in font_manager.findSystemFonts():
                if any(key in Path(path).name for key in ("CJK", "wqy", "DroidSansFallback", "SourceHan")):
                    font_manager.fontManager.addfont(path)
    warnings.warn(
        "no font with Chinese, Japanese and Korean glyphs is installed (Debian: apt-get install "
        "fonts-noto-cjk): router.png spells those characters as U+XXXX",
        stacklevel=2,
    )
    return None


@functools.cache
def charmaps() -> tuple:
    """The characters each font of pyplot()'s set-up has glyphs for."""
    from matplotlib import font_manager, ft2font

    fonts = [font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))]
    if cjk_font():
        fonts.append(font_manager.findfont(font_manager.FontProperties(family=cjk_font())))
    return tuple(ft2font.FT2Font(f).get_charmap() for f in fonts)


def can_draw(ch: str) -> bool:
    return any(ord(ch) in charmap for charmap in charmaps())


def printable(piece: str) -> str:
    """The piece as a tick label, with characters no font can draw spelled as U+XXXX."""
    return "".join(ch if can_draw(ch) else f"U+{ord(ch):04X}" for ch in piece)


# Colours of the diagrams: one per kind of thing, the same in every figure.
C_RESID, C_NORM, C_ATTN, C_MOE, C_ROUTER, C_EXPERT, C_CHOSEN, C_CACHE, C_NEW = (
    "#f2f2f2",
    "#fff2cc",
    "#dae8fc",
    "#e1d5e7",
    "#ffe6cc",
    "#eeeeee",
    "#d5e8d4",
    "#dae8fc",
    "#f8cecc",
)


def box(ax, x, y, w, h, text, color="white", fontsize=9, edge="#444444", weight="normal", **kw):
    """A rounded box centred at (x, y), w wide and h high, with centred text."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=color,
            edgecolor=edge,
            lw=1.0,
            **kw,
        )
    )
    if text:
        ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def arrow(ax, start, end, color="#444444", lw=1.2, style="-|>", **kw):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(
        FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=lw, shrinkA=0, shrinkB=0, **kw)
    )


def canvas(ax, xlim, ylim):
    ax.set(xlim=xlim, ylim=ylim, aspect="equal")
    ax.axis("off")
