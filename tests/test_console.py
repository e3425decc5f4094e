"""The run's console: plain lines off a terminal, a bar that fits 80 columns on one, and the MFU figure's FLOPs."""

import io

import torch

from mlm.model import DistilBertConfig
from mlm.run import metrics
from mlm.run.metrics import Console, flops_per_token, peak_flops

VALUES = {"epoch": 0.5, "loss": 4.56261, "lr": 8.3333e-5, "grad_norm": 1.25, "tokens_per_second": 12345.6,
          "mfu": None}


def test_flops_per_token_counts_the_matmuls_of_every_layer_and_the_head():
    config = DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=64)
    d, f, v, seq = 16, 64, 100, 8
    per_layer = 4 * d * d + 2 * d * f + 2 * seq * d
    assert flops_per_token(config, seq) == 6 * (2 * per_layer + d * d + d * v)
    # Given labels, the last block's output projection and feed-forward and the head run at the labelled rows only.
    skipped = 0.75 * (d * d + 2 * d * f + d * d + d * v)
    assert flops_per_token(config, seq, 0.25) == 6 * (2 * per_layer + d * d + d * v - skipped)


def test_peak_flops_is_known_for_named_gpus_only(monkeypatch):
    assert peak_flops(torch.device("cpu"), "fp32") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), "bf16") == metrics.PEAK_FLOPS["H100"]["bf16"]
    for name, gpu in (("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
                      ("NVIDIA A100-SXM4-80GB", "A100")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda"), "fp16") == metrics.PEAK_FLOPS[gpu]["fp16"], name
    for name in ("Some Future GPU", "NVIDIA A10G"):  # no word-for-word match: no guess
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda"), "bf16") is None


def test_off_a_terminal_each_log_is_one_plain_line(capsys):
    console = Console(True, True, total=10, done=2)  # pytest's stderr is not a terminal
    console.step()
    console.log(3, {**VALUES, "mfu": 0.4123})
    console.say("saved a checkpoint")
    console.close()
    out, err = capsys.readouterr()
    assert out == ("step 3/10: epoch 0.50, loss 4.5626, lr 8.33e-05, grad norm 1.250, 12,346 tokens/s, mfu 41.2%\n"
                   "saved a checkpoint\n")
    assert "\r" not in out + err


def test_other_processes_print_nothing(capsys):
    console = Console(False, True, total=10, done=0)
    console.step()
    console.log(1, VALUES)
    console.say("hello")
    assert capsys.readouterr() == ("", "")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_carries_the_figures_within_80_columns(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setenv("COLUMNS", "80")
    console = Console(True, True, total=1000, done=0)
    for _ in range(3):
        console.step()
    console.log(3, {**VALUES, "mfu": 0.4123})
    console.close()
    frames = [frame.strip() for frame in terminal.getvalue().split("\r") if frame.strip()]
    assert frames[-1].startswith("train 3/1000 [")
    assert frames[-1].endswith("], loss 4.5626, lr 8.33e-05, mfu 41.2%")
    assert max(len(frame) for frame in frames) <= 80
    # --no-progress: plain lines on a terminal too
    console = Console(True, False, total=10, done=0)
    console.step()
    assert console.bar is None


def test_a_repeated_sigterm_keeps_the_checkpoint_and_a_second_ctrl_c_stops_at_once():
    """Schedulers send SIGTERM more than once (SLURM to every process and to torchrun, which forwards it): the save
    the first one asked for must still happen. Ctrl-C twice is the user asking to stop now."""
    import os
    import signal

    import pytest

    from mlm.errors import Interrupted
    from mlm.run.signals import Signals

    with Signals() as signals, signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM"
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_ignored_when_the_run_starts_stays_ignored():
    """nohup ignores SIGHUP, and a shell's background job SIGINT: the run took them over, so a nohup run stopped when
    its terminal closed."""
    import os
    import signal

    from mlm.run.signals import Signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with Signals() as signals, signals.deferred():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert signals.received is None
            os.kill(os.getpid(), signal.SIGTERM)  # not ignored: still a stop
            assert signals.received == "SIGTERM"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
