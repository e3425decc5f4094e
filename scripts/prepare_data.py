"""`mlm-prepare-data` for a checkout: tokenize and chunk a corpus once and cache the chunks.

The program is mlm/cli/prepare_data.py; `python scripts/prepare_data.py --help` explains it.
"""

from mlm.cli.prepare_data import main, parse_args, run  # noqa: F401  (tests use the names from here)

if __name__ == "__main__":
    run()
