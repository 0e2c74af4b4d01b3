"""Running ``zshard train``: the launcher (validation before launch, torch's elastic agent,
restarts, signals, one-line failures) and the training loop every worker runs
(``python -m zshard.train.run._loop``)."""

from zshard.train.run._launch import EXIT_STOPPED, LaunchConfig, last_committed, launch, preflight

__all__ = ["EXIT_STOPPED", "LaunchConfig", "last_committed", "launch", "preflight"]
