"""Screenshot a report page in headless Chromium: its top (the summary and the trade-off curves) and its
per-input explorer with one input picked, stacked into one PNG (the README's docs/report_screenshot.png).

    python scripts/report_screenshot.py RUN/report.html docs/report_screenshot.png \
        --strategy voting --result wrong

Fails when the page logs a console error, throws, or asks for the network.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

from layerexit.report.browser import open_page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path, help="a page written by `layerexit report`")
    parser.add_argument("output", type=Path, help="PNG to write")
    parser.add_argument("--strategy", default="", help="explorer: the strategy to filter by (its name, e.g. voting)")
    parser.add_argument("--result", choices=["", "right", "wrong"], default="", help="explorer: right or wrong only")
    parser.add_argument("--pick", type=int, default=0, help="explorer: which matching row to open (0: the first)")
    parser.add_argument("--width", type=int, default=1400, help="viewport width in pixels")
    args = parser.parse_args()

    with open_page(args.page, width=args.width, height=1000) as opened:
        page = opened.page
        page.wait_for_selector("#input-layers tbody tr")
        if args.strategy:
            names = page.eval_on_selector_all("#f-strategy option", "os => os.map(o => o.textContent)")
            index = next(i for i, n in enumerate(names) if n.split(":")[0] == args.strategy)
            page.select_option("#f-strategy", str(index))
        if args.result:
            page.select_option("#f-correct", args.result)
        page.locator("#inputs tbody tr").nth(args.pick).click()
        page.evaluate("document.querySelector('nav').style.position = 'static'")  # not repeated in the clips
        page.wait_for_timeout(800)  # plotly's transitions
        top = page.eval_on_selector("#per-layer", "s => s.getBoundingClientRect().top + window.scrollY")
        shots = [page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": args.width, "height": top})]
        explorer = page.eval_on_selector(
            "#explorer",
            "s => { const r = s.getBoundingClientRect(); const d = document.getElementById('input-layers')"
            ".getBoundingClientRect(); return [r.top + window.scrollY, d.bottom - r.top]; }",
        )
        shots.append(
            page.screenshot(
                full_page=True,
                clip={"x": 0, "y": explorer[0] - 10, "width": args.width, "height": explorer[1] + 20},
            )
        )
        if opened.problems:
            print("\n".join(opened.problems), file=sys.stderr)
            return 1
    images = [Image.open(io.BytesIO(s)) for s in shots]
    out = Image.new("RGB", (args.width, sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height
    out.save(args.output, optimize=True)
    print(f"wrote {args.output} ({out.width}x{out.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
