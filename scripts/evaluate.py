"""`mlm-evaluate` for a checkout: score models side by side on the same frozen eval set.

The program is mlm/cli/evaluate.py; `python scripts/evaluate.py --help` explains it.
"""

from mlm.cli.evaluate import build_parser, main, run  # noqa: F401  (tests use the names from here)

if __name__ == "__main__":
    run()
