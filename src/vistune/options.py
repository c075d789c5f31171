"""``[METHOD.]KEY=VALUE``: the one grammar of ``--set``, for every command that takes method options.

``KEY=VALUE`` applies to every method of the command (each of ``vistune bench --methods``, the one
``--method`` of ``vistune train``); ``METHOD.KEY=VALUE`` applies to that method alone and beats a bare
pair with the same key, whatever their order. A pair repeated in the same form: the last one counts.
Values stay strings; whoever reads them gives them their type (a method's config its options, the bench
its per-method settings), because only they know it.

    sets = parse_sets(["reduction=8", "linear.epochs=30"], ["adapter", "linear"])
    sets.for_method("linear")        # {"reduction": "8", "epochs": "30"}
    # vistune train --method adapter --set reduction=8   (or --set adapter.reduction=8)
    parse_sets(pairs, ["adapter"], methods_flag="--method").for_method("adapter")
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import VistuneError, suggest


@dataclass(frozen=True)
class OptionSets:
    """Parsed ``--set`` pairs: those for every method and those for one method each."""

    shared: dict[str, str] = field(default_factory=dict)  # KEY=VALUE
    by_method: dict[str, dict[str, str]] = field(default_factory=dict)  # METHOD.KEY=VALUE

    def for_method(self, method: str) -> dict[str, str]:
        """The options of one method: the shared pairs, overridden by that method's own."""
        return {**self.shared, **self.by_method.get(method, {})}


def parse_sets(pairs: Iterable[str] | None, methods: Sequence[str], *, flag: str = "--set",
               methods_flag: str = "--methods") -> OptionSets:
    """Parse ``[METHOD.]KEY=VALUE`` pairs for the command's ``methods`` (named on the command line by
    ``methods_flag``). A malformed pair, or a METHOD that is not one of ``methods``, is a VistuneError."""
    methods = list(methods)
    example = methods[0] if methods else "adapter"
    shared: dict[str, str] = {}
    by_method: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        lhs, eq, value = pair.partition("=")
        method, dot, key = lhs.partition(".")
        method, key = (method.strip(), key.strip()) if dot else ("", method.strip())
        if not eq or not key or (dot and not method):
            raise VistuneError(
                f"{flag} {pair!r} is not key=value (KEY=VALUE or METHOD.KEY=VALUE)",
                f"write e.g. {flag} {key or 'KEY'}=VALUE (every method in {methods_flag}) or "
                f"{flag} {example}.{key or 'KEY'}=VALUE ({example} only)",
            )
        if not dot:
            shared[key] = value.strip()
            continue
        if method not in methods:
            raise VistuneError(
                f"{flag} {pair!r} names method {method!r}, which is not in {methods_flag} "
                f"({','.join(methods)}).{suggest(method, methods)}",
                f"prefix it with one of {', '.join(methods)}, or write {flag} {key}={value.strip()} "
                f"for every method in {methods_flag}",
            )
        by_method.setdefault(method, {})[key] = value.strip()
    return OptionSets(shared=shared, by_method=by_method)
