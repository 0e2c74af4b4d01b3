"""The optimizer step's arithmetic on flat partitions: optimizers (windowed, state by key), fp16
loss scaling and the learning-rate schedule."""

from zshard.train.optim._build import build_optimizer
from zshard.train.optim._lamb import Lamb, TensorwiseItem, tensorwise_step
from zshard.train.optim._optimizers import SGD, Adam, FlatOptimizer
from zshard.train.optim._precision import LossScaleError, LossScaler, module_dtype
from zshard.train.optim._schedule import lr_at, momentum_at, optimizer_at

__all__ = [
    "SGD",
    "Adam",
    "FlatOptimizer",
    "Lamb",
    "LossScaleError",
    "LossScaler",
    "TensorwiseItem",
    "build_optimizer",
    "lr_at",
    "module_dtype",
    "momentum_at",
    "optimizer_at",
    "tensorwise_step",
]
