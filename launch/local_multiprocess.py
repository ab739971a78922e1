"""Run a multi-process JAX job on this machine: N processes x D CPU devices, jax.distributed + gloo.

python -m launch.local_multiprocess --num_processes 2 --devices_per_process 2 -- \\
    python -m launch.train --config configs/tiny.py --workdir /tmp/tiny_2x2

Starts the command N times with the environment a multi-host launcher would give it
(JAX_COORDINATOR_ADDRESS=localhost:<free port>, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i) plus
XLA_FLAGS=--xla_force_host_platform_device_count=D and JAX_PLATFORMS=cpu, so the code path of a
pod (``jdiff.parallel.initialize_distributed``, cross-process collectives, per-process data
slices, orbax's coordinated checkpoint writes) runs and can be tested here. Output lines are
prefixed with ``[process i]``. Waits for all; if one fails the others are stopped (they would
otherwise wait for it until the coordinator's heartbeat timeout) and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

__all__ = ["free_port", "process_env", "run"]


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def process_env(
    base: Mapping[str, str], coordinator: str, num_processes: int, process_id: int, devices_per_process: int
) -> dict[str, str]:
    """The environment of process ``process_id``: coordinator, process count and id, and D CPU devices."""
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COORDINATOR_ADDRESS"] = coordinator
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
    return env


def _pump(stream, prefix: str, sink, tail: list[str]) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line)
        del tail[:-200]
        if sink is not None:
            sink.write(prefix + line)
            sink.flush()
    stream.close()


def run(
    command: Sequence[str],
    num_processes: int,
    devices_per_process: int = 1,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    echo: bool = True,
) -> list[str]:
    """Run ``command`` as ``num_processes`` cooperating JAX processes on localhost.

    Args:
      command: the program and its arguments, e.g. ``[sys.executable, "-m", "launch.train", ...]``.
      num_processes: N >= 1.
      devices_per_process: D >= 1 CPU devices per process (N x D devices in all).
      env: the base environment (default ``os.environ``).
      cwd: working directory of the processes.
      timeout: seconds before every process is stopped and the run counts as failed.
      echo: copy each process's output to stdout, prefixed with ``[process i]``.

    Returns:
      The combined output of each process (its last 200 lines).

    Raises:
      ValueError: bad arguments.
      RuntimeError: a process exited non-zero or the timeout passed; the message holds the
        failing process's last output lines.
    """
    if not command:
        raise ValueError("command: expected a program to run, got an empty command")
    for name, value in (("num_processes", num_processes), ("devices_per_process", devices_per_process)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    coordinator = f"localhost:{free_port()}"
    base = os.environ if env is None else env
    procs, tails, pumps = [], [], []
    for i in range(num_processes):
        p = subprocess.Popen(
            list(command), env=process_env(base, coordinator, num_processes, i, devices_per_process), cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        tail: list[str] = []
        t = threading.Thread(target=_pump, args=(p.stdout, f"[process {i}] ", sys.stdout if echo else None, tail), daemon=True)
        t.start()
        procs.append(p)
        tails.append(tail)
        pumps.append(t)

    deadline = None if timeout is None else time.monotonic() + timeout
    failed: tuple[int, str] | None = None
    while failed is None and any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0):
                failed = (i, f"exited with code {p.returncode}")
                break
        if failed is None and deadline is not None and time.monotonic() > deadline:
            failed = (-1, f"timed out after {timeout} s")
        time.sleep(0.1)
    if failed is None:
        bad = [i for i, p in enumerate(procs) if p.returncode != 0]
        if bad:
            failed = (bad[0], f"exited with code {procs[bad[0]].returncode}")
    if failed is not None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for t in pumps:
        t.join(timeout=10)
    outputs = ["".join(tail) for tail in tails]
    if failed is not None:
        i, why = failed
        shown = max(i, 0)
        raise RuntimeError(
            f"local multi-process run of {' '.join(command)!r}: process {i if i >= 0 else 'set'} {why}; "
            f"last output of process {shown}:\n{''.join(tails[shown][-40:])}"
        )
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m launch.local_multiprocess --num_processes N [--devices_per_process D] -- COMMAND ...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m launch.local_multiprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
    args = parser.parse_args(argv[:split])
    try:
        run(argv[split + 1 :], args.num_processes, args.devices_per_process, timeout=args.timeout)
    except ValueError as e:
        parser.error(str(e))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
