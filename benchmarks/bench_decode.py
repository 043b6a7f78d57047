"""`spotlight bench ...` without going through the main CLI (for device runs before it is wired).

    PYTHONPATH=src python3 benchmarks/bench_decode.py decode --shape llama3-8b --context 32K,128K --batch 1,3,8
"""

import argparse
import sys

from spotlight_attn.cli import bench_cmd

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="spotlight")
    bench_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(args.run(args))
