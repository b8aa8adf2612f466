#!/usr/bin/env python
"""Screenshot HTML reports in headless Chromium, as a person would see them (issue 16: every report is checked
this way before its layout changes land). Needs a Chromium binary (Debian: `apt-get install chromium`); the
flags keep it off the network, which is closed here anyway.

    python tools/screenshot.py runs/demo/report.html eval/mine/report.html --out shots/ [--width 1150]

Writes one PNG per page (named after its folder) the full height of the page.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def page_height(browser: str, page: Path, width: int, profile: str) -> int:
    """The rendered page's full height in CSS pixels (from the DOM Chromium dumps)."""
    script = ("<script>document.title=document.documentElement.scrollHeight</script>")
    probe = page.with_name(f".{page.stem}.height.html")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    try:
        dom = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},800",
                              "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink(missing_ok=True)
    head = dom.stdout.split("<title>", 1)[-1].split("</title>", 1)[0]
    return int(head) if head.isdigit() else 3000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="+")
    ap.add_argument("--out", default="shots")
    ap.add_argument("--width", type=int, default=1150)
    args = ap.parse_args()
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("screenshot: no Chromium found; install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        for p in map(Path, args.pages):
            if not p.is_file():
                print(f"screenshot: {p} is not a file", file=sys.stderr)
                return 2
            height = page_height(browser, p, args.width, profile)
            target = out / f"{p.parent.name or 'page'}-{p.stem}.png"
            subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.width},{height}",
                            f"--screenshot={target.resolve()}", p.resolve().as_uri()], capture_output=True,
                           timeout=120, check=True)
            print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
