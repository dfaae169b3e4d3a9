"""Write the README's knockout figure from a finished `mmlens flow` run.

mmlens flow --out runs/flow
pip install "kaleido>=1"     # plotly's static image export; it drives a Chrome or Chromium
BROWSER_PATH=$(which chromium) python docs/gen_figures.py runs/flow docs/img/knockout_shapes_llava.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mmlens.plotting import knockout_curves

FLOWS = ("question->last", "image->last", "last->last", "image->question")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="output folder of `mmlens flow`")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    flow = pd.read_csv(args.run / "flow.csv")
    rows = flow[flow["flow"].isin(FLOWS)].drop(columns="task")
    n = rows["example_id"].nunique()
    run_file = args.run / "run.json"
    window = json.loads(run_file.read_text()).get("window") if run_file.is_file() else None
    figure = knockout_curves(
        rows, title=f"shapes-llava: attention knockout, mean and 95% band ({n} questions)"
    )
    if window is not None:
        figure.update_xaxes(title=f"centre layer (window {window})")
    figure.write_image(args.out, width=820, height=420, scale=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
