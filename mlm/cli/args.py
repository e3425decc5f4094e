"""The commands' flags, made from TrainConfig's fields (mlm/settings.py) so that a setting's help, choices and
default are declared once, and their errors: one line each, a setting the library names in backquotes
(`train_size`) printed as its flag (--train-size).
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from mlm.chunks import parse_size
from mlm.errors import MLMError, run_cli
from mlm.settings import TrainConfig

SETTINGS = {spec.name: spec for spec in fields(TrainConfig)}
# Hugging Face's names (TrainingArguments, run_mlm's arguments) for mlm's flags.
HUGGING_FACE_NAMES = {
    "model_name_or_path": "--model", "tokenizer_name": "--tokenizer", "model_revision": "--revision",
    "dataset_name": "--dataset", "train_file": "--dataset", "validation_file": "--validation-file",
    "max_seq_length": "--chunk-size", "block_size": "--chunk-size", "per_device_train_batch_size": "--batch-size",
    "per_device_eval_batch_size": "--eval-batch-size", "gradient_accumulation_steps": "--grad-accum",
    "learning_rate": "--lr", "num_train_epochs": "--epochs", "warmup_ratio": "--warmup-steps (a fraction below 1)",
    "logging_steps": "--log-every", "eval_steps": "--eval-every", "save_steps": "--save-every",
    "save_total_limit": "--keep-checkpoints", "fp16": "--precision fp16", "bf16": "--precision bf16",
    "overwrite_output_dir": "--overwrite", "resume_from_checkpoint": "--resume",
    "dataloader_num_workers": "--num-workers", "hub_private_repo": "--hub-private", "torch_compile": "--compile",
    "whole_word_mask": "--masking wwm", "lr_scheduler_type": "--lr-scheduler", "no_cuda": "--device cpu",
    "use_cpu": "--device cpu", "preprocessing_num_workers": "(none: tokenizing uses every core)",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line plus a pointer to --help, exit status 2, that refuses
    abbreviations (so a typo never picks another flag), and that suggests the flag meant for an unknown one, mapping
    the names of Hugging Face's Trainer and run_mlm (--per_device_train_batch_size, --learning_rate, …) to mlm's."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        script = Path(sys.argv[0])
        if script.parent.name == "cli" and script.parent.parent.name == "mlm":  # python -m mlm.cli.train, torchrun -m
            kwargs.setdefault("prog", f"python -m mlm.cli.{script.stem}")
        super().__init__(*args, **kwargs)
        self.hints: dict[str, str] = {}  # an unknown flag -> what to say about it, for this command

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            # A word after an unknown flag is that flag's value, not a second file of an unquoted glob.
            hints = [hint for before, word in zip(["", *words], words)
                     if not (before.startswith("--") and "=" not in before and not word.startswith("--"))
                     and (hint := self.suggestion(word))]
            message += "".join(f" ({hint})" for hint in dict.fromkeys(hints))
        self.exit(2, f"error: {message.rstrip('.')}. Run `{self.prog} --help` for every flag.\n")

    def suggestion(self, word: str) -> str | None:
        if not word.startswith("--"):  # a file the shell expanded a glob to, after the one the flag took
            return "a glob left unquoted? Quote it, e.g. --dataset 'corpus/*.jsonl'" if Path(word).exists() else None
        name = word[2:].split("=", 1)[0]
        if "--" + name in self.hints:
            return self.hints["--" + name]
        if name in HUGGING_FACE_NAMES:
            ours = HUGGING_FACE_NAMES[name]
            if (flag := ours.split()[0]).startswith("--") and flag not in self._option_string_actions:
                return f"{word} is Hugging Face's name for mlm-train's {flag}, which {self.prog} does not take"
            return f"{word} is Hugging Face's name: mlm's is {ours}"
        known = [option for option in self._option_string_actions if option.startswith("--")]
        close = difflib.get_close_matches("--" + name.replace("_", "-"), known, n=1, cutoff=0.75)  # exact first
        return f"did you mean {close[0]}?" if close else None


def flag_of(setting: str) -> str | None:
    """The flag of a TrainConfig setting (its metadata's, or --name-with-dashes); None for other words."""
    return SETTINGS[setting].metadata.get("flag", "--" + setting.replace("_", "-")) if setting in SETTINGS else None


def run_command(main) -> None:
    """run_cli (mlm/errors.py) with the settings named by their flags."""
    run_cli(main, flag_of=flag_of)


def add_settings(parser: argparse.ArgumentParser, names: list[str] | None = None, *, group: str | None = None,
                 helps: dict[str, str] | None = None, **defaults) -> dict:
    """Add the flags of the TrainConfig settings `names` (default: all), each in its group of --help (or all in
    `group`), from the fields' metadata; `helps` and `defaults` replace fields' help texts and defaults where another
    command gives a setting another role (mlm-evaluate's prompts are shown per model, not before and after training).
    Returns the groups by title, for a command to add its own flags to one."""
    groups = {}
    for name in names or SETTINGS:
        spec = SETTINGS[name]
        options = {key: value for key, value in spec.metadata.items() if key not in ("help", "group", "flag", "type")}
        help_text = (helps or {}).get(name, spec.metadata["help"])
        group_name, kind = group or spec.metadata["group"], spec.metadata.get("type")
        default = defaults.get(name, spec.default)
        if name in defaults:  # the command's own default replaces the one the help describes
            help_text = re.sub(r" \(default: [^)]*\)", "", help_text)
        if isinstance(default, bool) and "action" not in options:
            options["action"] = "store_false" if default else "store_true"
        elif options.get("action") == "append":
            options["default"] = None  # the values given, or the field's default when none is
        elif "choices" not in options:
            types = {"size": size_flag(name), "splits": split_list, "count_or_fraction": number}
            options["type"] = types.get(kind, kind) or (type(default) if default is not None else str)
        shown = "" if isinstance(default, bool) or default is None or "(default" in help_text else \
            f" (default: {default if not isinstance(default, tuple) else ','.join(default)})"
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        groups[group_name].add_argument(flag_of(name), dest=name, help=help_text.replace("%", "%%") + shown,
                                        **{"default": default, **options})
    return groups


def settings_given(args: argparse.Namespace) -> dict:
    """The TrainConfig fields of parsed `args`, a repeatable flag given no value taking its field's default."""
    return {name: tuple(value or SETTINGS[name].default) if SETTINGS[name].metadata.get("action") == "append" else value
            for name, value in vars(args).items() if name in SETTINGS}


def flags_given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The `dest` names of the options typed on the command line `argv` (None: sys.argv's), whatever their values:
    a flag given with its default value counts too. Once `argv` has parsed, its option words are exactly those that
    are an option string, alone or before "=VALUE" (abbreviations are refused, a value cannot look like a flag)."""
    words = sys.argv[1:] if argv is None else argv
    return {action.dest for action in parser._actions for option in action.option_strings
            for word in words if word == option or word.startswith(option + "=")}


def size_flag(setting: str):
    """An argparse `type` for --train-size/--test-size: `parse_size` with its message as the usage error."""
    def size(text: str) -> int | str:
        try:
            return parse_size(text, setting)
        except MLMError as err:
            raise argparse.ArgumentTypeError(re.sub(r"^`\w+` ", "", str(err))) from None  # argparse names the flag

    return size


def number(text: str) -> int | float:
    """An argparse `type` for a count that may also be a fraction (--warmup-steps 50 or 0.06): a whole number stays
    an int, so run.json records 50, not 50.0."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def absolute_if_local(value: str | None, *, always: bool = False) -> str | None:
    """`value` as an absolute path when it names a local file or folder, or a glob, or `always` (a folder to be
    made); else (a Hub id, None) as it is.

    A run record is read again from other directories (--resume, mlm-evaluate, the model card), where a relative
    path would name nothing, or a Hub repo of that name.
    """
    if value is not None and (always or Path(value).expanduser().exists() or glob.has_magic(value)):
        return os.path.abspath(Path(value).expanduser())
    return value
