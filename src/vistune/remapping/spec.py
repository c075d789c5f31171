"""Target architectures as text (``ARCH``, ``ARCH:KEY=VALUE,...`` or ``KEY=VALUE,...``) and as timm models."""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field

import timm
from torch import nn

from ..errors import VistuneError, suggest

SPEC_HELP = ("ARCH, ARCH:KEY=VALUE,... or KEY=VALUE,... (the source's architecture and options with these "
             "replaced), e.g. vit_small_patch16_224:depth=3,embed_dim=128 or depths=[1,1,3,1]")
_WORDS = {"true": True, "false": False, "none": None, "null": None}


@dataclass(frozen=True)
class ArchSpec:
    """A timm architecture (``None``: the source's) and the ``timm.create_model`` options given for it."""

    architecture: str | None
    options: dict = field(default_factory=dict)

    def resolve(self, source_architecture: str, source_options: dict) -> tuple[str, dict]:
        """(architecture, options): a named architecture takes exactly its options; without one, the source's
        architecture and options with the given ones replaced."""
        if self.architecture is not None:
            return self.architecture, dict(self.options)
        return source_architecture, {**source_options, **self.options}


def _split_top_level(text: str, where: str) -> list[str]:
    """Split on commas that are not inside brackets: ``depths=[1,1,3,1],dims=[8,16]`` → 2 parts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise VistuneError(f"{where}: unbalanced {ch!r} in {text!r}", "close every bracket you open")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise VistuneError(f"{where}: unclosed bracket in {text!r}", "close every bracket you open")
    parts.append(text[start:])
    return parts


def _value(key: str, raw: str, where: str):
    if raw.lower() in _WORDS:
        return _WORDS[raw.lower()]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.replace("_", "").replace("-", "").isalnum() and not raw[0].isdigit():
            return raw  # a bare word such as global_pool=avg
        raise VistuneError(f"{where}: value {raw!r} of {key!r} is not a number, list, true/false/none or a word",
                           f"write e.g. {key}=3, {key}=0.5, {key}=[1,2] or {key}=avg") from None
    # JSON types only: the options go into the checkpoint's metadata as JSON and must read back the same
    return json.loads(json.dumps(value))


def parse_arch_spec(text: str, where: str = "--to") -> ArchSpec:
    """Parse ``ARCH``, ``ARCH:KEY=VALUE,...`` or ``KEY=VALUE,...`` (values: numbers, [lists], true/false/none,
    words). Raises a VistuneError that names the offending part."""
    text = text.strip()
    if not text:
        raise VistuneError(f"{where}: empty architecture", f"give {SPEC_HELP}")
    arch, colon, rest = text.partition(":")
    if not colon:
        arch, rest = (None, text) if "=" in text else (text, "")
    arch = arch.strip() if arch is not None else None
    if arch == "":
        arch = None  # ":depth=3" reads like "depth=3"
    options: dict = {}
    for part in _split_top_level(rest, where) if rest.strip() else []:
        key, eq, raw = (s.strip() for s in part.partition("="))
        if not eq or not key or not raw:
            raise VistuneError(f"{where}: {part.strip()!r} in {text!r} is not KEY=VALUE",
                               f"give {SPEC_HELP}")
        if not key.isidentifier():
            raise VistuneError(f"{where}: {key!r} is not an option name", "option names are timm keyword "
                               "arguments such as depth, embed_dim, num_heads, mlp_ratio, depths, dims")
        if key in options:
            raise VistuneError(f"{where}: option {key!r} given twice in {text!r}", "give each option once")
        options[key] = _value(key, raw, where)
    return ArchSpec(arch, options)


def format_arch_spec(architecture: str, options: dict) -> str:
    """The inverse of :func:`parse_arch_spec` (for messages and reports)."""
    if not options:
        return architecture
    return architecture + ":" + ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())


def build_model(architecture: str, options: dict, where: str = "--to") -> nn.Module:
    """A headless timm model with random weights; unknown names and options are VistuneErrors."""
    try:
        return timm.create_model(architecture, pretrained=False, num_classes=0, **options)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise VistuneError(f"{where}: unknown timm architecture {architecture!r}."
                               f"{suggest(architecture, timm.list_models())}",
                               "see timm.list_models() for the names") from None
        raise VistuneError(f"{where}: timm could not build {format_arch_spec(architecture, options)}: {e}",
                           "check the options against the timm model's constructor") from None
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise VistuneError(f"{where}: timm could not build {format_arch_spec(architecture, options)}: "
                           f"{type(e).__name__}: {e}",
                           "check the options against the timm model's constructor (e.g. embed_dim must be "
                           "divisible by num_heads)") from None
