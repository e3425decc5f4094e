"""Usage errors are one `error:` line in every command (issue 19 item 8), and a missing local path is named as one."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import mlm.errors
import mlm.files.hub
from mlm.cli import evaluate, fill_mask, prepare_data, train
from mlm.errors import MLMError, run_cli
from mlm.files.hub import resolve_repo
from mlm.files.pretrained import load_pretrained

SMOKE = Path(mlm.__file__).resolve().parent / "smoke"
COMMANDS = {"train": train.main, "evaluate": evaluate.main, "fill_mask": fill_mask.main,
            "prepare_data": prepare_data.main}


def exit_and_stderr(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(argv))
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


@pytest.mark.parametrize("command, argv, names", [
    ("train", ["--masking", "wmm"], "invalid choice: 'wmm'"),
    ("train", ["--batch-size", "eight"], "invalid int value: 'eight'"),
    ("train", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("evaluate", ["--model", "m", "--eval-masking", "wmm"], "invalid choice: 'wmm'"),
    ("evaluate", [], "the following arguments are required: --model"),
    ("fill_mask", ["--top-k", "1.5", "a [MASK]"], "invalid int value: '1.5'"),
    ("fill_mask", [], "the following arguments are required: sentences"),
    ("prepare_data", ["--chunk-size", "big"], "invalid int value: 'big'"),
])
def test_a_usage_error_is_one_line_with_a_hint_to_help(capsys, command, argv, names):
    status, out, err = exit_and_stderr(COMMANDS[command], argv, capsys)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert names in err and "--help" in err and "usage:" not in err


def test_a_flags_value_is_not_taken_for_a_glob_and_evaluate_explains_its_missing_train_size(capsys, tmp_path):
    # `mlm-prepare-data --model FOLDER`: the folder, the unknown flag's value, got "a glob left unquoted?" too.
    status, _, err = exit_and_stderr(prepare_data.main, ["--model", str(tmp_path)], capsys)
    assert status == 2 and "glob" not in err and "--tokenizer" in err
    status, _, err = exit_and_stderr(evaluate.main, ["--model", "m", "--train-size", "32"], capsys)  # "--train-splits?"
    assert status == 2 and "(mlm-evaluate draws no train chunks: --test-size sets the eval set)" in err


@pytest.mark.parametrize("command, argv, hint", [
    ("train", ["--learning_rate", "1e-4"], "(--learning_rate is Hugging Face's name: mlm's is --lr)"),
    # The hint named --lr to mlm-fill-mask, which has no such flag.
    ("fill_mask", ["--learning_rate", "1", "a [MASK]"], "Hugging Face's name for mlm-train's --lr, which "),
    # `--dataset corpus/*.jsonl` unquoted: the shell passes the second file as a word of its own.
    ("prepare_data", ["--dataset", "a.jsonl", "b.jsonl", "c.jsonl"],
     "unrecognized arguments: b.jsonl c.jsonl (a glob left unquoted? Quote it, e.g. --dataset 'corpus/*.jsonl'). "),
])
def test_a_flag_of_hugging_face_or_an_unquoted_glob_gets_a_hint(capsys, tmp_path, monkeypatch, command, argv, hint):
    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        (tmp_path / name).write_text('{"text": "a review"}\n')
    status, _, err = exit_and_stderr(COMMANDS[command], argv, capsys)
    assert status == 2 and hint in err and err.count("\n") == 1, err


def test_a_vocab_report_of_no_words_is_refused(capsys):
    status, _, err = exit_and_stderr(prepare_data.main, ["--vocab-report", "0"], capsys)  # it printed an empty table
    assert status == 2 and err == "error: --vocab-report must be a count of words >= 1, got 0.\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_still_prints_every_flag(capsys, command):
    status, out, _ = exit_and_stderr(COMMANDS[command], ["--help"], capsys)
    assert status == 0 and out.startswith("usage:") and "--help" in out and out.count("\n") > 10


def test_each_flag_of_mlm_train_is_in_its_group_once(capsys):
    # --hub-model-id was listed under "output", apart from --push-to-hub and --hub-private.
    _, out, _ = exit_and_stderr(train.main, ["--help"], capsys)
    groups = {block.split(":\n", 1)[0]: block for block in out.split("\n\n")}
    assert out.count("Hugging Face Hub:") == 1
    assert all(flag in groups["Hugging Face Hub"] for flag in ("--hub-model-id", "--push-to-hub", "--hub-private"))


@pytest.fixture()
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a local path went to the Hub")

    monkeypatch.setattr(mlm.files.hub, "_download", refuse)


@pytest.mark.parametrize("name", ["runs/typo", "./typo", "../typo", "~/no-such-mlm-folder", "/no/such/folder"])
def test_a_missing_local_path_is_no_such_folder(tmp_path, monkeypatch, no_hub, name):
    (tmp_path / "runs").mkdir()  # an existing parent folder: runs/typo can only be a local path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MLMError, match="No such folder"):
        resolve_repo(name)
    with pytest.raises(MLMError, match="No such folder"):
        load_pretrained(name)


def test_a_missing_run_folder_is_one_line_in_fill_mask(tmp_path, monkeypatch, no_hub, capsys):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    status, _, err = exit_and_stderr(fill_mask.main, ["--model", "runs/imbd", "a [MASK] ."], capsys)
    assert status == 2 and err.startswith("error: No such folder: runs/imbd") and err.count("\n") == 1


def test_a_repo_id_without_such_a_parent_folder_still_goes_to_the_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)  # no ./org folder here
    with pytest.raises(AssertionError, match="went to the Hub"):
        resolve_repo("org/name")


def test_only_mlms_own_warnings_are_one_line(capsys):
    """A warning from mlm's package is one 'warning:' line; one from any other code, even a folder whose name starts
    like mlm's (mlm_extra/), keeps Python's format."""

    package = Path(mlm.__file__).resolve().parent
    shown = []
    show = mlm.errors._one_line_warnings(lambda *args: shown.append(args), lambda message: message.replace("`", "'"))
    show(UserWarning("ours, `cache_dir`"), UserWarning, str(package / "corpus_store.py"), 1)
    show(UserWarning("theirs"), UserWarning, str(package) + "_extra/x.py", 1)
    assert capsys.readouterr().err == "warning: ours, 'cache_dir'\n" and len(shown) == 1  # settings as flags
    writes = []  # one write per line: torchrun's processes share one stderr, and print() makes two
    show(UserWarning("ours"), UserWarning, str(package / "corpus_store.py"), 1,
         file=type("Stream", (), {"write": lambda self, text: writes.append(text)})())
    assert writes == ["warning: ours\n"]
    # Said once: the same folder walked from two places of mlm (the data, then its digests) warned twice.
    show(UserWarning("ours, `cache_dir`"), UserWarning, str(package / "files" / "data_files.py"), 9)
    assert capsys.readouterr().err == ""


def test_a_reader_that_goes_away_does_not_stop_the_command(monkeypatch, capsys):
    # `mlm-train | head`: the first line after head exits was a BrokenPipeError traceback, and the run failed (before
    # its first checkpoint, the folder was undone). The command now goes on, its output going nowhere.
    import io
    import os
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone
    closed = io.TextIOWrapper(io.FileIO(write, "w"), line_buffering=True)
    monkeypatch.setattr(sys, "stdout", closed)
    done = []

    def main():
        print("step 10: loss 9.87")
        print("step 20: loss 9.12", flush=True)
        done.append(True)

    run_cli(main)
    assert done and sys.stdout is closed and "Traceback" not in capsys.readouterr().err


def test_output_still_buffered_when_the_reader_left_ends_nothing_in_an_error(tmp_path):
    # Buffered output (no PYTHONUNBUFFERED) that the reader never took was flushed at exit, after run_cli, into the
    # closed pipe: "Exception ignored … BrokenPipeError" and exit status 120.
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    # 20,000 characters: two full buffers written, the rest still buffered when the reader leaves.
    code = "import time; from mlm.errors import run_cli; run_cli(lambda: (print('x' * 20_000), time.sleep(1)))"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.read(10)
    process.stdout.close()  # as `| head -c 10` does
    assert process.wait(timeout=60) == 0 and b"BrokenPipe" not in process.stderr.read()


def test_a_closed_stdout_is_no_error(monkeypatch):
    # `mlm-fill-mask … >&-`: Python sets sys.stdout to None and print() does nothing; the wrapper must not fail.
    import sys

    monkeypatch.setattr(sys, "stdout", None)
    run_cli(lambda: print("nobody reads this"))


def test_under_torchrun_the_other_processes_name_themselves_and_leave_a_stop_to_process_0(monkeypatch, capsys):
    # Every process met the same bad input and printed the same line; each printed its own, wrong, way to continue.
    def fails():
        raise MLMError("no such data")

    def stopped():
        raise mlm.errors.Interrupted("SIGTERM", hint="Continue with: mlm-train --resume latest")

    process_0 = ("error: no such data\n", "error: interrupted (SIGTERM). Continue with: mlm-train --resume latest\n")
    # One of torchrun's processes ends with os._exit (tests/test_distributed.py says why): here, as sys.exit does.
    ended = []
    monkeypatch.setattr(mlm.errors, "_end_torchrun_process", lambda code: (ended.append(code), sys.exit(code)))
    # RANK alone (a job that exports it, no torchrun) or empty is no process of a run of several.
    for rank, world_size, expected in (("0", "2", process_0), ("1", "2", ("error: [rank 1] no such data\n", "")),
                                       ("1", "1", process_0), ("", "", process_0)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world_size)
        for main, code, err in zip((fails, stopped), (2, 143), expected):
            assert exit_and_stderr(lambda argv, main=main: main(), [], capsys) == (code, "", err)
    # An interrupted run exits with its own status (mlm/cli/train.py), as a torchrun process too; each process's
    # line is one write, so that two processes' lines on one stream do not run into each other.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ended.clear()
    assert exit_and_stderr(lambda argv: sys.exit(143), [], capsys) == (143, "", "") and ended == [143]
    writes = []
    stream = type("Stream", (), {"write": lambda self, text: writes.append(text), "flush": lambda self: None})
    monkeypatch.setattr("sys.stderr", stream())
    with pytest.raises(SystemExit):
        run_cli(fails)
    assert writes == ["error: [rank 1] no such data\n"]


def test_run_as_a_module_the_help_pointer_names_the_module(monkeypatch, capsys):
    # `python -m mlm.cli.train` (and torchrun's `-m mlm.cli.train`) said "Run `train.py --help`", no such file there.
    monkeypatch.setattr("sys.argv", [str(train.__file__)])
    code, _, err = exit_and_stderr(train.main, ["--masking", "wmm"], capsys)
    assert code == 2 and err.endswith("Run `python -m mlm.cli.train --help` for every flag.\n")


def test_a_hub_repo_id_is_checked_without_a_push_and_hub_private_needs_one(capsys, tmp_path):
    # Without --push-to-hub neither was checked: the run finished, and its model card's usage read
    # `--model bad id with spaces`; --hub-private did nothing, without a word.
    run = ["--smoke", "--output-dir", str(tmp_path / "run")]
    status, _, err = exit_and_stderr(train.main, [*run, "--hub-model-id", "bad id with spaces"], capsys)
    assert status == 2 and err.startswith("error: 'bad id with spaces' is not a Hub repo id (") and err.count("\n") == 1
    status, _, err = exit_and_stderr(train.main, [*run, "--hub-private"], capsys)
    assert status == 2 and err == ("error: --hub-private makes the repo that --push-to-hub creates private: add "
                                   "--push-to-hub, or leave --hub-private out.\n")
    assert not (tmp_path / "run").exists()


def test_an_output_folder_that_is_a_file_and_a_model_without_weights_are_named_so(capsys, tmp_path):
    # It said "Cannot write to the output folder afile: File exists. ... (and check the free space)".
    (tmp_path / "afile").write_text("mine")
    for output_dir in ("afile", "afile/sub"):
        status, _, err = exit_and_stderr(train.main, ["--smoke", "--output-dir", str(tmp_path / output_dir)], capsys)
        assert status == 2 and err == (f"error: The output folder {tmp_path / output_dir} cannot be made: "
                                       f"{tmp_path / 'afile'} is a file. Choose another `output_dir`.\n")
    # mlm-fill-mask was told to "start from a random model with --init random", a flag only mlm-train has.
    (tmp_path / "model").mkdir()
    shutil.copy(SMOKE / "config.json", tmp_path / "model")
    status, _, err = exit_and_stderr(fill_mask.main, ["--model", str(tmp_path / "model"), "a [MASK]"], capsys)
    assert status == 2 and err.endswith("Point to a folder that has the weights; without any, mlm-train --init "
                                        "random trains a model of this configuration from scratch.\n")


def test_a_quoted_reason_is_cut_at_a_word():
    # "… This is typically caused by a remote worker c)": a process's reason for stopping, cut mid-word.
    from mlm.errors import clipped

    reason = "Connection closed by peer [127.0.0.1]:6536. This is typically caused by a remote worker crash."
    assert clipped(reason, 80) == "Connection closed by peer [127.0.0.1]:6536. This is typically caused by a…"
    assert clipped(" a\n b ", 80) == "a b" and clipped("x" * 100, 10) == "x" * 9 + "…"
    assert clipped("aaaaaa bbb ccc", 11) == "aaaaaa bbb…"  # a word that ends at the cut is whole
