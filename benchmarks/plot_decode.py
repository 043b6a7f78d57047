"""Draw docs/decode_*.png from the JSON rows that `spotlight bench decode --json` wrote.

    python3 benchmarks/plot_decode.py OUT.png "title" rows1.json [rows2.json ...]

docs/decode_generate.png: python3 benchmarks/plot_decode.py docs/decode_generate.png "..." docs/results/decode_generate.json
"""

import json
import sys

from spotlight_attn.decode_bench import DecodeRow, plot

if __name__ == "__main__":
    out, title, *paths = sys.argv[1:]
    rows = [DecodeRow(**row) for path in paths for row in json.load(open(path))]
    plot(rows, out, title)
    print(f"wrote {out} ({len(rows)} rows)")
