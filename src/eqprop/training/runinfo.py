"""Where a run came from: one record per training session in the run folder's run_info.json.

A session is one call of `Trainer.fit` (the first start, then each resume). Its record says
which code ran (package version, git commit of the checkout and whether tracked files had
local changes), on what (torch, device, CPU count, torch threads) and how it was started
(the command line). `eqprop report` prints these beside the metrics, so a number in the docs
can be traced to the code and command that produced it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt_io

__all__ = ["RUN_INFO", "code_version", "cpu_model", "read_run_info", "record_session"]

RUN_INFO = "run_info.json"


def code_version() -> dict:
    """Package version and, when the package is imported from a git checkout, its commit
    and whether tracked files differ from it (None where git or the checkout is missing)."""
    from importlib import metadata

    try:
        version = metadata.version("eqprop")
    except metadata.PackageNotFoundError:
        version = None
    src = Path(__file__).resolve().parent
    commit = dirty = None
    try:
        run = {"cwd": src, "capture_output": True, "text": True, "timeout": 10}
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": version, "git_commit": commit, "git_dirty": dirty}


def cpu_model() -> str | None:
    """The processor's name (Linux: /proc/cpuinfo), None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def read_run_info(out_dir: str | os.PathLike) -> list[dict]:
    """The session records of a run folder ([] when it has none, as for runs made before
    sessions were recorded). A damaged file raises ValueError naming it."""
    path = Path(out_dir) / RUN_INFO
    if not path.exists():
        return []
    try:
        sessions = json.loads(path.read_text())["sessions"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a run_info file ({type(e).__name__}: {e})") from None
    if not isinstance(sessions, list):
        raise ValueError(f"{path}: 'sessions' must be a list")
    return sessions


def record_session(out_dir: str | os.PathLike, *, fresh: bool, start_epoch: int, device: torch.device,
                   world_size: int = 1, command: str | None = None) -> dict:
    """Append this session's record to the run folder's run_info.json (a fresh run starts a
    new file) and return it. `command` defaults to the process's command line. Written
    atomically; call it on the main rank only."""
    if command is None and sys.argv and sys.argv[0]:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    out = Path(out_dir)
    sessions = [] if fresh else read_run_info(out)
    session = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "start_epoch": start_epoch,
        "command": command,
        **code_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
    }
    sessions.append(session)
    ckpt_io.write_text_atomic(out / RUN_INFO, json.dumps({"sessions": sessions}, indent=1) + "\n")
    return session
