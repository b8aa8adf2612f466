#!/usr/bin/env python
"""Render the Noto colour emoji to PNG files: a small real image set that needs no download.

Needs Debian's fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji).

    python bench/make_emoji_dataset.py OUT_DIR [--size 64] [--limit N]
"""
import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
RANGES = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF),
          (0x2600, 0x26FF)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    if not Path(FONT).is_file():
        print(f"error: {FONT} not found; apt-get install fonts-noto-color-emoji", file=sys.stderr)
        return 2
    font = ImageFont.truetype(FONT, 109)  # the bitmap strike size of this font
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for lo, hi in RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if font.getmask(ch).getbbox() is None:
                continue  # no glyph
            canvas = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
            ImageDraw.Draw(canvas).text((4, 0), ch, font=font, embedded_color=True)
            box = canvas.getbbox()
            if box is None:
                continue
            bg = Image.new("RGB", canvas.size, (255, 255, 255))
            bg.paste(canvas, mask=canvas.split()[3])
            bg = bg.crop((0, 0, 128, 128)).resize((args.size, args.size), Image.LANCZOS)
            bg.save(out / f"u{cp:05x}.png")
            n += 1
            if args.limit and n >= args.limit:
                print(f"{n} images in {out}")
                return 0
    print(f"{n} images in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
