"""The method registry. Importing this package registers every built-in method."""
from . import adapter, bias, full, linear, mlp, partial, pgn, pro_tuning, sct, sidetune, vpt, vpt_pad  # noqa: F401  (registration)
from . import dora, ia3, ln_tuning, lora, ssf  # noqa: F401  (registration; peft is imported lazily)
from .base import (
    CATEGORIES,
    METHODS,
    Method,
    MethodConfig,
    MethodInfo,
    adapt,
    count_parameters,
    make_config,
    register,
    resolve_method,
)

__all__ = [
    "CATEGORIES", "METHODS", "Method", "MethodConfig", "MethodInfo", "adapt", "count_parameters",
    "make_config", "register", "resolve_method",
]
