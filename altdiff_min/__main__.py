"""`python -m altdiff_min`: the command line (altdiff_min/apps/cli.py)."""
import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
