"""Optimizers: the registry of built-in ones, weight-decay parameter groups, and user-supplied optimizers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from steadyfit.config import TrainConfig

__all__ = [
    "OPTIMIZER_FACTORIES",
    "OptimizerFactory",
    "ParamGroups",
    "build_optimizer",
    "param_groups",
    "resolve_optimizer",
]

ParamGroups = list[dict[str, Any]]
OptimizerFactory = Callable[[ParamGroups, TrainConfig], torch.optim.Optimizer]

_OPTIM_EXTRA_HINT = "pip install steadyfit[optim]"


_FUSED_DEVICES = ("cpu", "cuda")


def _adam_kernel(groups: ParamGroups) -> dict[str, bool]:
    """torch's fused Adam kernel where it applies, else foreach.

    The fused kernel takes a device-side ``found_inf`` flag, so a non-finite step is skipped without the
    host reading anything (guarantee 9, see :class:`steadyfit.guard.DeviceSkip`). It agrees with torch's
    other Adam kernels to rounding, not bitwise (the Hugging Face Trainer's default, ``adamw_torch_fused``,
    is the same kernel). SGD keeps foreach: bitwise equal to a hand-written ``torch.optim.SGD`` loop, which
    fused SGD is not on CPU. FSDP's sharded parameters (DTensors) keep foreach.
    """
    params = [p for group in groups for p in group["params"]]
    fused = all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in _FUSED_DEVICES
        for p in params
    )
    return {"fused": True} if fused else {"foreach": True}


def _adam_defaults(config: TrainConfig) -> dict[str, Any]:
    """The config's values as the optimizer's defaults. The groups carry their own weight decay; the
    defaults are what a group added later (an unfreezing callback's ``add_param_group``) gets, so none of
    them may be the optimizer's hidden own (AdamW's 0.01)."""
    return {"lr": config.lr, "betas": config.betas, "eps": config.eps, "weight_decay": config.weight_decay}


def _sgd(groups: ParamGroups, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        foreach=True,
    )


def _adam(groups: ParamGroups, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, **_adam_defaults(config), **_adam_kernel(groups))


def _adamw(groups: ParamGroups, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, **_adam_defaults(config), **_adam_kernel(groups))


def _adafactor(groups: ParamGroups, config: TrainConfig) -> torch.optim.Optimizer:
    # foreach is left to torch here: on CPU its foreach Adafactor is not bitwise equal to the default
    # one, and every built-in optimizer must match its plain torch counterpart on the same device.
    # betas and eps are Adam's and have no meaning for Adafactor (its decay is beta2_decay, its eps a pair).
    return torch.optim.Adafactor(groups, lr=config.lr, weight_decay=config.weight_decay)


def _import_pytorch_optimizer(name: str) -> Any:
    try:
        import pytorch_optimizer
    except ImportError:
        raise ImportError(
            f"optimizer={name} needs the pytorch-optimizer package: {_OPTIM_EXTRA_HINT}"
        ) from None
    return pytorch_optimizer


def _lamb(groups: ParamGroups, config: TrainConfig) -> torch.optim.Optimizer:
    lamb = _import_pytorch_optimizer("lamb").Lamb
    return lamb(groups, **_adam_defaults(config), foreach=True)


def _lion(groups: ParamGroups, config: TrainConfig) -> torch.optim.Optimizer:
    lion = _import_pytorch_optimizer("lion").Lion
    return lion(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, foreach=True)


OPTIMIZER_FACTORIES: dict[str, OptimizerFactory] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adafactor": _adafactor,
    "lamb": _lamb,
    "lion": _lion,
}
"""Name (``TrainConfig.optimizer``) -> factory taking the parameter groups and the config.

A new optimizer drops in with one entry here and its name in ``TrainConfig.optimizer``.
"""


def param_groups(model: torch.nn.Module, weight_decay: float) -> ParamGroups:
    """Split the trainable parameters of ``model`` into a weight-decay group and a no-decay group.

    Parameters with two or more dimensions (weight matrices, embeddings, convolution kernels) decay;
    biases and normalisation weights (fewer than two dimensions) do not. With ``weight_decay == 0``
    there is nothing to split and one group keeps the model's parameter order, so the optimizer and its
    ``state_dict`` are laid out exactly as ``Optimizer(model.parameters())`` would be.

    Args:
        model: the model whose parameters with ``requires_grad`` are optimised.
        weight_decay: the decay of the first group.

    Returns:
        Parameter groups for a torch optimizer; empty groups are left out.

    Raises:
        ValueError: when the model has no parameter with ``requires_grad=True``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> [(len(g["params"]), g["weight_decay"]) for g in param_groups(model, 0.1)]
        [(1, 0.1), (1, 0.0)]
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameters with requires_grad=True: there is nothing to optimise")
    if weight_decay == 0:
        return [{"params": trainable, "weight_decay": 0.0}]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by ``config.optimizer`` over the trainable parameters of ``model``.

    Weight decay applies to parameters with two or more dimensions only (see :func:`param_groups`).
    docs/optimizers.md lists how each config field maps onto each optimizer.

    Args:
        model: the model to optimise (already wrapped for distribution, if it will be).
        config: supplies optimizer, lr, weight_decay, momentum, nesterov, betas and eps.

    Returns:
        A torch optimizer.

    Raises:
        ValueError: when the model has no trainable parameter.
        ImportError: for lamb and lion without the ``optim`` extra installed.

    Example:
        >>> config = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9)
        >>> type(build_optimizer(torch.nn.Linear(4, 2), config)).__name__
        'SGD'
    """
    factory = OPTIMIZER_FACTORIES[config.optimizer]
    return factory(param_groups(model, config.weight_decay), config)


def resolve_optimizer(
    model: torch.nn.Module,
    config: TrainConfig,
    optimizer_or_factory: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of a run: the user's own if given, otherwise one built from the config.

    Args:
        model: the model being trained.
        config: used only when ``optimizer_or_factory`` is None.
        optimizer_or_factory: None (build from ``config``); an optimizer over parameters of ``model``; or a
            callable returning one. The callable receives the list of trainable parameters (so an optimizer
            class or ``functools.partial(torch.optim.AdamW, lr=3e-4)`` works), or the model itself when its
            first parameter is named ``model`` or ``module``.

    Returns:
        A torch optimizer whose parameters all belong to ``model``.

    Raises:
        TypeError: when the argument or what the factory returns is not a torch optimizer.
        ValueError: when the optimizer holds parameters that are not the model's.

    Example:
        >>> import functools
        >>> model = torch.nn.Linear(4, 2)
        >>> factory = functools.partial(torch.optim.SGD, lr=0.1)
        >>> type(resolve_optimizer(model, TrainConfig(), factory)).__name__
        'SGD'
    """
    if optimizer_or_factory is None:
        return build_optimizer(model, config)
    if isinstance(optimizer_or_factory, torch.optim.Optimizer):
        optimizer = optimizer_or_factory
    elif callable(optimizer_or_factory):
        if _wants_model(optimizer_or_factory):
            optimizer = optimizer_or_factory(model)
        else:
            optimizer = optimizer_or_factory([p for p in model.parameters() if p.requires_grad])
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer factory returned {type(optimizer).__name__}, expected a torch.optim.Optimizer"
            )
    else:
        raise TypeError(
            "optimizer: expected None, a torch.optim.Optimizer or a callable returning one, "
            f"got {type(optimizer_or_factory).__name__}"
        )
    _check_owns_parameters(model, optimizer)
    return optimizer


def _wants_model(factory: Callable[..., Any]) -> bool:
    if inspect.isclass(factory):
        return False
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[0].name in ("model", "module")


def _check_owns_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # An optimizer over other tensors (say, the model before it was wrapped or sharded) would train
    # nothing and report no error.
    owned = {id(p) for p in model.parameters()}
    foreign = sum(1 for p in _optimizer_params(optimizer) if id(p) not in owned)
    if foreign:
        raise ValueError(
            f"optimizer: {foreign} of its parameters are not parameters of the model being trained; "
            "build the optimizer from this model's parameters (after any wrapping or sharding)"
        )


def _optimizer_params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]
