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
from zshard.train.engine._host_alloc import (
    MMAP_THRESHOLD,
    apply_host_alloc_policy,
    release_free_heap,
)

__all__ = [
    "MMAP_THRESHOLD",
    "CheckpointMismatchError",
    "Checkpointable",
    "Checkpointer",
    "Engine",
    "apply_host_alloc_policy",
    "check_model_matches",
    "holds_checkpoints",
    "initialize",
    "release_free_heap",
    "resume_source",
]
