"""Launch a command on N local processes with torchrun (`python -m torch.distributed.run`).

One node: `--standalone` rendezvous on a free local port. Several nodes: pass `nnodes` and a
`rdzv_endpoint` (host:port of node 0) and run the same command on every node. `max_restarts`
lets torchrun restart the whole group when a rank dies; the training loop then resumes from the
last distributed checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

from .layout import free_port

TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK")
LAUNCH_ID_ENV = "LONGCAT_LAUNCH_ID"  # marks every process of one launch, for the final clean-up


def is_torchrun_worker() -> bool:
    """True inside a process that torchrun started (then do not launch again)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(
    target: list[str],
    *,
    nproc: int,
    max_restarts: int = 0,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "longcat",
    monitor_interval: float = 0.5,
) -> list[str]:
    """The torchrun argv running `target` (["-m", "module", args...] or ["script.py", args...])."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", f"--monitor-interval={monitor_interval}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need rdzv_endpoint=HOST:PORT (node 0's address)")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
    return cmd + list(target)


def launch(
    target: list[str],
    *,
    nproc: int,
    max_restarts: int = 0,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    threads_per_rank: int | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    capture: bool = False,
) -> subprocess.CompletedProcess:
    """Run `target` under torchrun and wait. Raises subprocess.TimeoutExpired after `timeout` s.

    Whatever happens, no process is left behind: torchrun starts each rank in its own session,
    so they are found by a launch id in their environment and killed once torchrun is done (a
    rank stuck in a collective may ignore torchrun's SIGTERM).
    """
    cmd = torchrun_command(target, nproc=nproc, max_restarts=max_restarts, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)
    launch_id = uuid.uuid4().hex
    full_env = dict(os.environ)
    full_env[LAUNCH_ID_ENV] = launch_id
    for key in TORCHRUN_ENV + ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # a nested launch must not inherit an outer run's rank
    if threads_per_rank is not None:
        full_env["OMP_NUM_THREADS"] = str(threads_per_rank)
    full_env.update(env or {})
    proc = subprocess.Popen(
        cmd, env=full_env, start_new_session=True,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None, text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_launch(proc, launch_id)
        out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out) from None
    except BaseException:
        _kill_launch(proc, launch_id)
        raise
    _kill_launch(proc, launch_id)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _kill_launch(proc: subprocess.Popen, launch_id: str) -> None:
    """SIGKILL torchrun's session and every process carrying this launch's id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in launched_pids(launch_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def launched_pids(launch_id: str) -> list[int]:
    """PIDs whose environment holds LONGCAT_LAUNCH_ID=launch_id (Linux /proc; [] elsewhere)."""
    marker = f"{LAUNCH_ID_ENV}={launch_id}".encode()
    found = []
    proc_root = "/proc"
    if not os.path.isdir(proc_root):
        return found
    for name in os.listdir(proc_root):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"{proc_root}/{name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def relaunch_argv(argv: list[str], drop: tuple[str, ...] = ("--nproc", "--max-restarts")) -> list[str]:
    """argv without the launcher's own options (`--nproc 2` / `--nproc=2`), for the workers."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in drop:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def run_under_torchrun(argv: list[str], *, nproc: int, max_restarts: int = 0, nnodes: int = 1,
                       rdzv_endpoint: str | None = None) -> int:
    """Re-run `longcat <argv>` on `nproc` local processes; returns torchrun's exit code.

    For `longcat train --nproc 2 --parallel dp_shard=2`: the CLI calls this with sys.argv[1:]
    when `not is_torchrun_worker()`; the workers see the same arguments without --nproc and
    --max-restarts (and WORLD_SIZE/RANK in their environment).
    """
    target = ["-m", "longcat.cli", *relaunch_argv(argv)]
    return launch(target, nproc=nproc, max_restarts=max_restarts, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint).returncode


__all__ = ["launch", "torchrun_command", "is_torchrun_worker", "relaunch_argv", "run_under_torchrun"]
