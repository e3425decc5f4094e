"""`mlm-fill-mask` for a checkout: predict the [MASK] tokens of sentences with a DistilBERT MLM.

The program is mlm/cli/fill_mask.py; `python scripts/fill_mask.py --help` explains it.
"""

from mlm.cli.fill_mask import main, parse_args, run  # noqa: F401  (tests use the names from here)

if __name__ == "__main__":
    run()
