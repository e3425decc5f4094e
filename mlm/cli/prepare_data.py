"""Tokenize and chunk IMDb (or any text corpus, any size) once into a store on disk, and print what came out.

    mlm-prepare-data --dataset path/to/imdb \\
        --tokenizer path/to/distilbert-base-uncased

Training reads the same store, so running this first only moves the tokenizing cost out of the training run.
Preparation streams in bounded memory; interrupted, the same command continues where it stopped
(docs/corpora.md).
"""

from __future__ import annotations

import argparse
import time

from mlm.cli.args import ArgumentParser, add_settings, flag_of, run_command, split_list
from mlm.corpus import load_chunks
from mlm.data import split_train_test
from mlm.errors import Interrupted, MLMError, name_flags
from mlm.files.hub import resolve_repo, set_progress_bars
from mlm.files.pretrained import CONFIG_FILE, read_config
from mlm.run.signals import Signals
from mlm.speed.fast_encode import fast_tokenizer
from mlm.tokenizer import TOKENIZER_FILES, tokenizer_from_folder
from mlm.vocabulary import count_words, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="distilbert-base-uncased",
                        help="Hub model repo id or local folder with tokenizer.json; its config.json, if present, "
                             "bounds --chunk-size by the model's longest sequence (default: %(default)s)")
    parser.add_argument("--splits", type=split_list, default="train",
                        help="comma-separated splits to prepare, e.g. train,test,unsupervised (default: %(default)s)")
    parser.add_argument("--revision", default=None,
                        help="git revision of the Hub dataset repo (branch, tag or commit); Hub ids only")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write a store: tokenize the whole split in memory")
    parser.add_argument("--vocab-report", nargs="?", type=int, const=20, metavar="N",
                        help="instead of preparing, print the splits' fertility (tokens per word) and the N (20) "
                             "words the tokenizer cuts in the most tokens, for --add-tokens (docs/base-models.md)")
    add_settings(parser, ["dataset", "text_column", "chunk_size", "group_size", "cache_dir", "fast_tokenize",
                          "train_size", "test_size", "data_seed", "progress_bar"], group="the data (mlm-train's flags)",
                 helps={"data_seed": "seed of the train/eval draw this checks, as mlm-train's --data-seed draws it"})
    parser.hints["--model"] = "mlm-prepare-data needs the model's tokenizer only: --tokenizer MODEL"
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_progress_bars(args.progress_bar)
    if not args.splits:
        raise MLMError("--splits is empty; name at least one split, e.g. --splits train.")
    if args.vocab_report is not None and args.vocab_report < 1:  # 0 printed a table of no words
        raise MLMError(f"--vocab-report must be a count of words >= 1, got {args.vocab_report}.")
    folder = resolve_repo(args.tokenizer, allow_patterns=(*TOKENIZER_FILES, CONFIG_FILE))
    tokenizer = tokenizer_from_folder(folder)
    # The longest sequence the model of the config.json beside the tokenizer takes bounds the chunk size.
    max_positions = read_config(folder / CONFIG_FILE).max_length if (folder / CONFIG_FILE).is_file() else None
    if args.vocab_report is not None:
        counts = count_words(args.dataset, args.splits, tokenizer, text_column=args.text_column, revision=args.revision)
        print(report(counts, tokenizer, top=args.vocab_report))
        return
    if args.fast_tokenize == "on":
        tokenizer = fast_tokenizer(tokenizer)
    rows = []
    for split in args.splits:
        start = time.perf_counter()
        try:
            with Signals():  # SIGTERM and SIGHUP stop it as Ctrl-C does: one line, the work so far kept
                chunks = load_chunks(
                    args.dataset, split, tokenizer,
                    chunk_size=args.chunk_size, group_size=args.group_size, text_column=args.text_column,
                    revision=args.revision, cache_dir=args.cache_dir, max_length=max_positions,
                    use_cache=not args.no_cache, progress=args.progress_bar,
                )
        except KeyboardInterrupt as err:  # say what an interrupted preparation keeps
            name = err.signal_name if isinstance(err, Interrupted) else "SIGINT"
            hint = ("Nothing was stored (--no-cache)." if args.no_cache else "Run the same command again: the "
                    "preparation continues after its last completed piece (docs/corpora.md).")
            raise Interrupted(name, hint) from None
        rows.append((split, chunks, time.perf_counter() - start))
    print(f"{'split':<13} {'texts':>9} {'tokens':>12} {'chunks':>9} {'load s':>7}  cache")
    for split, chunks, seconds in rows:
        print(f"{split:<13} {chunks.n_reviews:>9,} {chunks.n_tokens:>12,} {len(chunks):>9,} {seconds:>7.2f}  "
              f"{chunks.cache_path or '(not cached)'}")
    for chunks in [chunks for split, chunks, _ in rows if split == "train"]:
        try:
            train, test = split_train_test(chunks, train_size=args.train_size, test_size=args.test_size,
                                           seed=args.data_seed)
        except MLMError as err:  # the preparation worked: the draw is what training would make of it, information
            kept = (f" The chunks are stored ({chunks.cache_path}), and training reuses them."
                    if chunks.cache_path else "")
            print(f"note: training would stop at this draw: {name_flags(str(err), flag_of)} E.g. --train-size all "
                  f"--test-size 5%.{kept}")
            continue
        share = len(train) / (len(chunks) - len(test))
        print(f"downsampled train split (seed {args.data_seed}): {len(train):,} train chunks, "
              f"{len(test):,} test chunks of {chunks.chunk_size} tokens"
              + (f"; {f'{share:.0%}' if share >= 0.01 else 'under 1%'} of the chunks left to train on (--train-size "
                 "all takes them all)"
                 if share < 0.5 else ""))


def run() -> None:
    """The `mlm-prepare-data` console script."""
    run_command(main)


if __name__ == "__main__":
    run()
