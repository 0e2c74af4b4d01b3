"""The engine: ``initialize(model, config)`` returns an :class:`Engine` that runs forward,
``backward(loss)`` and ``step()`` at ZeRO stages 0-3, and saves and loads its state through the
checkpoint store (``_checkpoint``)."""

from zshard.train.engine._checkpoint import (
    Checkpointable,
    Checkpointer,
    CheckpointMismatchError,
    check_model_matches,
    holds_checkpoints,
    resume_source,
)
from zshard.train.engine._engine import Engine, initialize

__all__ = [
    "CheckpointMismatchError",
    "Checkpointable",
    "Checkpointer",
    "Engine",
    "check_model_matches",
    "holds_checkpoints",
    "initialize",
    "resume_source",
]
