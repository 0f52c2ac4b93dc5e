"""``mlx.launch`` without its idle polling: ``python -m mlx_dgemma.launch`` takes mlx.launch's
arguments and runs mlx.launch's own code (MLX's ring backend, its hostfile, its environment).

Why: mlx.launch (MLX 0.32) relays each rank's output from a thread per rank that waits in
``select`` on the rank's stdin pipe too. That pipe is always writable, so the wait returns at
once and each thread spins; its main loop spins as well when its own stdin is at end of file
(a job started with ``< /dev/null``). On one machine those threads take the cores the ranks
compute on: two ring processes on a 2-core CPU took 1.9 s a Sudoku training step where each
alone takes 0.9 s, and 0.96 s with this launcher (benchmarks/sudoku/README.md).

What changes: the ranks' stdin is left out of the wait (nothing is forwarded to the ranks'
stdin), and the launcher's own stdin becomes a pipe that never has data, so both loops
sleep until a rank writes. Across machines mlx.launch works as well; this matters where the
launcher shares the machine with its ranks.

A SIGINT does not end the launcher: its ranks on this machine are in its process group and
got the same signal (a terminal's Ctrl-C, or ``sudoku.train``'s relay), and a trainer's ranks
then finish their step and save (``tuner.stop``); the launcher relays their output until
they exit. (In mlx.launch 0.32 the ``KeyboardInterrupt`` ends the loop that writes the ranks'
output.) The handler does nothing rather than ignore the signal: ignoring would pass to the ranks.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import List, Optional


def _wait_for_output(rlist, wlist, xlist, timeout=None):
    """``select`` for reading only: the ranks' stdin is never waited on."""
    readable, _, errors = select.select(rlist, [], xlist, timeout)
    return readable, [], errors


def main(argv: Optional[List[str]] = None) -> int:
    from mlx._distributed_utils import launch

    if not hasattr(launch, "select"):  # another MLX: its launcher as it is
        return launch.main()
    launch.select = _wait_for_output
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the ranks decide
    idle, _keep_open = os.pipe()  # the write end stays open: reads would block, select waits
    os.dup2(idle, 0)
    sys.stdin = os.fdopen(0, "r")
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return launch.main() or 0


if __name__ == "__main__":
    sys.exit(main())
