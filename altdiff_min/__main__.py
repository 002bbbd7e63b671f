"""Command line: `altdiff-min COMMAND …` (or `python -m altdiff_min COMMAND …`)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="altdiff-min", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the most complete part of the model that exists, on small random weights")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
