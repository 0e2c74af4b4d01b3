"""Running ``zshard train``: the launcher (validation before launch, torch's elastic agent,
restarts, one-line failures) and the training loop every worker runs
(``python -m zshard.train.run._loop``)."""

from zshard.train.run._launch import LaunchConfig, launch, preflight

__all__ = ["LaunchConfig", "launch", "preflight"]
