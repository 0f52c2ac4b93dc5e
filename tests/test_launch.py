"""``python -m mlx_dgemma.launch``: mlx.launch's code without its idle polling.

Two ring processes on this machine compute an all-reduce through it (the launcher still
starts a working ring), and while its ranks sleep the launcher itself takes almost no CPU
(mlx.launch 0.32 spins a core per rank there: the cores the ranks should train on)."""

import subprocess
import sys
import time
from pathlib import Path

from tests.test_tuner_distributed import free_ports

ROOT = Path(__file__).resolve().parents[1]


def launch(script: Path, n: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_dgemma.launch", "-n", str(n), "--backend", "ring", "--starting-port",
           str(free_ports(n)), "--env", f"PYTHONPATH={ROOT}", "--python", sys.executable, "--", str(script)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_ring_all_sum_through_the_launcher(tmp_path):
    script = tmp_path / "allsum.py"
    script.write_text("import mlx.core as mx\n"
                      "w = mx.distributed.init()\n"
                      "x = mx.distributed.all_sum(mx.array([w.rank() + 1.0, 10.0]), stream=mx.cpu)\n"
                      "print('RANK', w.rank(), 'OF', w.size(), x.tolist(), flush=True)\n")
    p = launch(script)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, out + err
    assert sorted(line for line in out.splitlines() if line.startswith("RANK")) == [
        "RANK 0 OF 2 [3.0, 20.0]", "RANK 1 OF 2 [3.0, 20.0]"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_launcher_idles_while_its_ranks_work(tmp_path):
    if not Path("/proc/self/stat").exists():
        import pytest

        pytest.skip("reads the launcher's CPU time from /proc (Linux)")
    script = tmp_path / "sleep.py"
    script.write_text("import sys, time\nprint('started', flush=True)\ntime.sleep(4)\n")
    p = launch(script, stdin=subprocess.DEVNULL)  # as a detached job starts it
    try:
        # both ranks started: from here the launcher only waits for them
        assert p.stdout.readline().startswith("started")
        assert p.stdout.readline().startswith("started")
        before, t0 = cpu_seconds(p.pid), time.monotonic()
        time.sleep(2.0)
        used, wall = cpu_seconds(p.pid) - before, time.monotonic() - t0
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert used < 0.1 * wall, f"the launcher used {used:.2f} s of CPU in {wall:.2f} s while its ranks slept"
