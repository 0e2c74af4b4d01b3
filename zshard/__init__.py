"""zshard: sharded training state for PyTorch, stored in one partitioned-tensor store."""

__version__ = "0.1.0"
