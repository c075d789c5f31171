"""The method registry. Importing this package imports every module in it, which registers each method
(a new method is one new file here: nothing else to edit)."""
import importlib
import pkgutil

from .base import (
    CATEGORIES,
    METHODS,
    TUNER_KINDS,
    Borrowed,
    Foldable,
    InputTuner,
    Method,
    MethodConfig,
    MethodInfo,
    ModuleTuner,
    SideTuner,
    TokenTuner,
    adapt,
    count_parameters,
    make_config,
    method_of,
    option,
    register,
    resolve_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # peft itself is imported lazily, when a method is built

__all__ = [
    "CATEGORIES", "METHODS", "TUNER_KINDS", "Borrowed", "Foldable", "InputTuner", "Method", "MethodConfig",
    "MethodInfo", "ModuleTuner", "SideTuner", "TokenTuner", "adapt", "count_parameters", "make_config", "method_of",
    "option", "register", "resolve_method",
]
