"""--gpus N / --nnodes N: the same command again under torchrun, one process per GPU (or CPU
process with gloo), and rank 0's own exit code back to the shell.

The launcher computes nothing itself; every rank runs `redheart.run.train`, and rank 0 writes
its exit code to the file named by REDHEART_EXIT_FILE (`tell_launcher`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from redheart.overrides import ConfigError

EXIT_FILE = "REDHEART_EXIT_FILE"  # environment variable: where rank 0 leaves its exit code


def add_arguments(p) -> None:
    g = p.add_argument_group("several GPUs or hosts (launched through torchrun)")
    g.add_argument("--gpus", type=int, default=1, help="processes (GPUs) on this host; >1 runs under torchrun")
    g.add_argument("--nnodes", type=int, default=1, help="number of hosts")
    g.add_argument("--node-rank", type=int, default=0, help="this host's rank (0 .. nnodes-1)")
    g.add_argument("--master-addr", default="127.0.0.1", help="address of the host with node rank 0")
    g.add_argument("--master-port", type=int, default=29500)
    g.add_argument("--rdzv-endpoint", help="host:port of a c10d rendezvous instead of --master-addr/--master-port")


def wanted(args) -> bool:
    """Whether this command is to be launched under torchrun (not from inside a rank of it)."""
    if args.gpus < 1 or args.nnodes < 1:
        raise ConfigError("--gpus and --nnodes must be >= 1")
    return (args.gpus > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ


# the flags above, each with the number of values it takes: left out of the ranks' command line
LAUNCH_FLAGS = {"--gpus": 1, "--nnodes": 1, "--node-rank": 1, "--master-addr": 1, "--master-port": 1,
                "--rdzv-endpoint": 1}


def launch_distributed(args, argv: list[str]) -> int:
    """Re-run this command under torchrun with one process per GPU (or CPU process with gloo)."""
    import subprocess

    device = args.device or "auto"
    for a in args.set:
        if a.startswith("train.device="):
            device = a.split("=", 1)[1]
    if device != "cpu":
        import torch  # only here: the launcher itself computes nothing (2 s saved per CPU launch)

        if not torch.cuda.is_available():
            raise ConfigError(f"--gpus {args.gpus}: no GPU is visible to PyTorch here "
                              "(add --device cpu to run that many CPU processes with gloo)")
        if torch.cuda.device_count() < args.gpus:
            raise ConfigError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) are visible on this host")
    rest, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = 0 if "=" in a else LAUNCH_FLAGS[name]
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.gpus}",
           f"--nnodes={args.nnodes}", "--max-restarts=0"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}"]
    elif args.nnodes > 1:
        cmd += [f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}", f"--master-port={args.master_port}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "redheart", *rest]
    print(f"[redheart] launching {args.gpus * args.nnodes} processes: {' '.join(cmd)}", file=sys.stderr)
    import signal
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "exit_code"
        # torchrun passes SIGTERM/SIGINT on to every rank; give them time to save before it kills
        env = {**os.environ, EXIT_FILE: str(exit_file),
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")}
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_stop_with_parent(os.getpid()))
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        # rank 0's own exit code (75 for a clean stop, ...) rather than torchrun's summary of it
        return int(exit_file.read_text()) if exit_file.exists() else code


def _stop_with_parent(parent: int):
    """For torchrun's process: SIGTERM when the launcher dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so its ranks stop after their step and save, as on Ctrl-C, instead of
    training on without anyone waiting for them."""
    import signal

    def arm() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: as before
            return
        if os.getppid() != parent:  # the launcher died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def tell_launcher(code: int) -> None:
    """Rank 0's exit code, for the launcher to return (75 for a clean stop, ...) rather than
    torchrun's summary of it; nothing without a launcher."""
    if os.environ.get(EXIT_FILE):
        Path(os.environ[EXIT_FILE]).write_text(str(code))
