"""The architectures, found by ``model_type`` (as mlx-lm finds its models).

Each architecture is a module here owning its ``ModelArgs`` (a dataclass on
:class:`~mlx_kssm.models.base.BaseModelArgs`) and its ``Model``, which implements the contract
described in base.py. To add one: write the module and add a line to ``MODEL_TYPES``; the
contract test (tests/test_contract.py) then runs over it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import BaseModelArgs, ConfigError

# model_type -> module in this package. An explicit table, not an import of whatever name a
# config.json holds: the config is user input.
# Short names for the command line (kssm train --arch ssm).
ARCH_NAMES: dict[str, str] = {
    "v3": "kssm_v3",
    "ssm": "kssm_ssm",
    "phase_mamba": "phase_mamba",
    "mamba_lm": "mamba",  # mlx-lm's Mamba, registered under mlx-lm's model_type
}

MODEL_TYPES: dict[str, str] = {
    "kssm_v3": "kssm_v3",
    "kssm_ssm": "kssm_ssm",
    "phase_mamba": "phase_mamba",
    "mamba": "mamba_lm",
}


def get_classes(model_type: str) -> tuple[type, type]:
    """(Model, ModelArgs) of ``model_type``; ConfigError naming the known types otherwise."""
    module = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if module is None:
        shown = repr(model_type)[:40]
        raise ConfigError(f"unknown model_type {shown}; known: {', '.join(sorted(MODEL_TYPES))}")
    arch = importlib.import_module(f"{__name__}.{module}")
    return arch.Model, arch.ModelArgs


def model_args_from_config(config: dict[str, Any] | BaseModelArgs) -> BaseModelArgs:
    """Validated ModelArgs from a config dict (``model_type`` picks the class; a config
    without one is a K-SSM v3 config, as every config written before the registry was)."""
    if isinstance(config, BaseModelArgs):
        config.validate()
        return config
    if not isinstance(config, dict):
        raise ConfigError(f"a model config must be a JSON object, not {type(config).__name__}")
    _, args_class = get_classes(config.get("model_type", "kssm_v3"))
    return args_class.from_config(config)


def build_model(config: dict[str, Any] | BaseModelArgs):
    """A freshly initialised Model from a config dict or a ModelArgs (validated first)."""
    args = model_args_from_config(config)
    model_class, _ = get_classes(args.model_type)
    return model_class(args)


def model_type_for(arch: str) -> str:
    """``--arch`` (a short name or a model_type) -> model_type; ConfigError when unknown."""
    model_type = ARCH_NAMES.get(arch, arch)
    if model_type not in MODEL_TYPES:
        names = sorted(set(ARCH_NAMES) | set(MODEL_TYPES))
        raise ConfigError(f"unknown --arch {arch!r:.40}; choose one of {', '.join(names)}")
    return model_type


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """What the architecture derives from the config before building (e.g. a Phase-Mamba's
    vocabulary, read from its base); most architectures derive nothing."""
    _, args_class = get_classes(config.get("model_type", "kssm_v3"))
    module = importlib.import_module(args_class.__module__)
    return module.complete_config(config) if hasattr(module, "complete_config") else config


def presets(model_type: str) -> dict[str, dict[str, Any]]:
    """The named model sizes of an architecture (its module's PRESETS)."""
    get_classes(model_type)
    return importlib.import_module(f"{__name__}.{MODEL_TYPES[model_type]}").PRESETS
