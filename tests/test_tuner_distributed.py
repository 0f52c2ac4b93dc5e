"""Data-parallel fine-tuning: two processes on the ring backend, each with half of every
batch, against one process with the whole batch (mlx.launch, as for mlx_lm.lora).

Equality holds because each process divides by the global token counts of the step and
draws its noise by dataset index, not by process. Bounds: the loss curves agree to float32
rounding of a sum of ~100 cross-entropies (~1e-7 relative, measured); the adapters after
six SGD steps (two micro-batches each) to ~1e-5 of their largest entry. SGD rather than
Adam: Adam divides by sqrt(v), so entries whose gradient is zero up to rounding move by
±lr either way, which is a property of Adam, not of the data parallelism under test.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from tests.test_tuner_train import ROOT, chat, env, tiny_model, write_data


def free_ports(n: int) -> int:
    """A first port whose next n - 1 are free too (mlx.launch's ring takes consecutive ports)."""
    for _ in range(50):
        socks = [socket.socket()]
        try:
            socks[0].bind(("127.0.0.1", 0))
            first = socks[0].getsockname()[1]
            for i in range(1, n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def test_two_ring_processes_equal_one(tmp_path):
    model = tiny_model(tmp_path / "m")
    rows = [chat(f"Question {i}: {'x' * (3 * i)}?", f"Answer {i}{'!' * (2 * i)}") for i in range(8)]
    data = write_data(tmp_path / "d", rows, valid=rows[:4])
    common = ["--model", model, "--train", "--data", data, "--batch-size", 4, "--grad-accumulation-steps", 2,
              "--iters", 6, "--steps-per-report", 1, "--steps-per-eval", 3, "--val-batches", -1,
              "--optimizer", "sgd", "--learning-rate", 0.5, "--save-every", 1000]
    common = [str(a) for a in common]
    one = subprocess.run([sys.executable, "-m", "mlx_dgemma.lora", *common, "--adapter-path", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env(), timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    launch = Path(sys.executable).with_name("mlx.launch")
    # the README's command, with both processes on this machine
    two = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "--starting-port",
                          str(free_ports(2)), "--env", f"PYTHONPATH={ROOT}",
                          "--python", sys.executable, "--", "-m", "mlx_dgemma.lora", *common,
                          "--adapter-path", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env(), timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("Iter 6: Train loss") == 1  # rank 0 reports, rank 1 is quiet

    h1 = json.loads((tmp_path / "one" / "losses.json").read_text())
    h2 = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert [sorted(h) for h in h1] == [sorted(h) for h in h2] and len(h1) == 6 + 3
    for a, b in zip(h1, h2):
        for k in a:
            if "loss" in k:
                assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (a["iteration"], k, a[k], b[k])
    train = [h["train_loss"] for h in h1 if "train_loss" in h]
    assert train[-1] < train[0]  # it did train

    w1 = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    w2 = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert sorted(w1) == sorted(w2)
    for k in w1:
        a, b = np.array(w1[k]), np.array(w2[k])
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), k
    assert any(np.abs(np.array(w1[k])).max() > 0 for k in w1 if k.endswith("lora_b"))
