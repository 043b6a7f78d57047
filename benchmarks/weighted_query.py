"""`spotlight eval retrieval` with the learned hash scored by a real-valued or quantised query (issue 14, item 3).

    PYTHONPATH=src python benchmarks/weighted_query.py --levels P eval retrieval --methods spotlight ...

Everything after the script's own options is a `spotlight` command line, run as the CLI runs it, except
that method `spotlight` scores keys with metrics.RealQuerySelector instead of Hamming agreement: the
query's pre-sign hash summed over the GQA group, against the same +-1 key codes (the same cache and
bytes read). `--levels real` keeps the weights real; `--levels P` rounds each weight's magnitude to
P bits (0 .. 2**P - 1 of its row's largest), which is what an integer kernel would score with P
popcounts of the query's bit planes. Results are labelled `spotlight` as usual: name the output
after P. The decode path itself (score_select) is untouched.

Against Hamming (plain `spotlight eval retrieval` on the same pack), paired over chunks:
`benchmarks/paired_retrieval.py --domain NAME hamming=HAMMING.json real=REAL.json 3=P3.json ...`.
"""

from __future__ import annotations

import argparse
import sys

from spotlight_attn.cli.main import main
from spotlight_attn.config import Method
from spotlight_attn.eval import common
from spotlight_attn.metrics import RealQuerySelector


def weighted_enable(levels: int | None):
    plain = common.Methods.enable

    def enable(self, spec, budget):
        installed = plain(self, spec, budget)
        if spec.method is Method.SPOTLIGHT:
            installed.selector = RealQuerySelector(installed.selector.hasher, Method.SPOTLIGHT, levels=levels)
        return installed

    return enable


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", required=True, help="'real', or the query weights' bits P (1 .. 8)")
    args, rest = parser.parse_known_args(argv)
    if args.levels != "real" and not (args.levels.isdigit() and 1 <= int(args.levels) <= 8):
        parser.error(f"--levels must be 'real' or 1 .. 8, got {args.levels!r}")
    if not rest or rest[0] != "eval":
        parser.error("give a `spotlight eval ...` command line after --levels")
    common.Methods.enable = weighted_enable(None if args.levels == "real" else int(args.levels))
    return main(rest)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
