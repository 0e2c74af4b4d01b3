"""The elastic agent of one ``zshard train`` attempt: ``torch.distributed.run`` plus three things.

The launcher runs this file as a script, with torchrun's arguments (not with ``-m``: importing
the zshard package first would cost every attempt about a second of CPU).

1. The agent dies with the launcher: ``PR_SET_PDEATHSIG`` (SIGKILL), then a check that its parent
   is still the launcher (it could have died before the request).
2. Its pid goes to the workers (``ZSHARD_AGENT_PID``), which die with it the same way.
3. Signals sent to the agent itself (SLURM signals every task of a step; a ``kill`` of its pid):
   torch's own handlers, which stop the workers at once, are left only SIGQUIT. SIGINT, SIGTERM,
   SIGHUP and the preemption signal write the stop request the launcher writes, so the workers
   finish their step and save exactly as when the launcher is signalled; the handlers are then
   reset, so a second signal kills the agent, and with it the workers.

This file imports nothing of zshard: keep its names in sync with ``_stop.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import sys
from types import FrameType

LAUNCHER_PID_ENV = "ZSHARD_LAUNCHER_PID"
AGENT_PID_ENV = "ZSHARD_AGENT_PID"
PREEMPT_ENV = "ZSHARD_PREEMPT_SIGNAL"
ERROR_DIR_ENV = "ZSHARD_ERROR_DIR"
STOP_REQUEST_FILE = "stop-request.json"

_SIGNALS: list[signal.Signals] = []


def _die_with_parent(expected_parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if expected_parent and os.getppid() != expected_parent:
        os._exit(1)


def _request_stop(signum: int, frame: FrameType | None) -> None:
    for sig in _SIGNALS:  # the next signal kills the agent (and its workers) at once
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_DFL)
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir:
        return
    path = os.path.join(error_dir, STOP_REQUEST_FILE)
    with contextlib.suppress(OSError):
        if not os.path.exists(path):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"signal": signal.Signals(signum).name, "from": "agent"}, f)
            os.replace(tmp, path)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]  # run as a script: this directory is no import root
    _die_with_parent(int(os.environ.get(LAUNCHER_PID_ENV, "0")))
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    names = ["SIGINT", "SIGTERM", "SIGHUP", os.environ.get(PREEMPT_ENV, "")]
    for name in dict.fromkeys(n for n in names if n):
        sig = signal.Signals[name]
        signal.signal(sig, _request_stop)
        _SIGNALS.append(sig)

    from torch.distributed import run as torchrun

    args = sys.argv[1:]
    if "--signals-to-handle" in torchrun.get_args_parser()._option_string_actions:
        args = ["--signals-to-handle=SIGQUIT", *args]  # it sets the variable below itself
    else:  # older torch reads only the variable
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGQUIT"
    torchrun.main(args)


if __name__ == "__main__":
    main()
