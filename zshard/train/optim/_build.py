"""``build_optimizer``: the flat optimizer an ``optimizer`` config names."""

from __future__ import annotations

from zshard.train.config import OptimizerConfig
from zshard.train.optim._lamb import Lamb
from zshard.train.optim._optimizers import SGD, Adam, FlatOptimizer


def build_optimizer(cfg: OptimizerConfig) -> FlatOptimizer:
    if cfg.name == "lamb":
        return Lamb(
            cfg.betas,
            cfg.eps,
            cfg.weight_decay,
            max_coeff=cfg.max_coeff,
            min_coeff=cfg.min_coeff,
            bias_correction=cfg.bias_correction,
            eps_inside_sqrt=cfg.eps_inside_sqrt,
        )
    if cfg.name == "sgd":
        return SGD(momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return Adam(
        betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, decoupled=cfg.name == "adamw"
    )
