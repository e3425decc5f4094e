"""`mlm-train` for a checkout: fine-tune DistilBERT with the masked-language-model objective (the course run).

The program is mlm/cli/train.py; `python scripts/train.py --help` explains it.
"""

from mlm.cli.train import SMOKE, build_parser, main, print_summary, run  # noqa: F401  (tests use the names from here)

if __name__ == "__main__":
    run()
