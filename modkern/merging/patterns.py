"""Name patterns and alpha rules, as merge_state_dicts and merge_checkpoints take them.

A pattern with a glob character (`*`, `?`, `[`) must match the whole name (fnmatch); any
other pattern matches when it occurs in the name (so `"mlp"` selects what the paper's
released code merged). An alpha rule is a float, a mapping pattern -> float (first match
wins), or a function of the name returning a float or None (None: do not merge).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping

from ..checks import check_alpha
from ..errors import AlphaError, OptionError


AlphaRule = float | Mapping[str, float] | Callable[[str], "float | None"]
Patterns = str | Iterable[str] | None


def matches(name: str, pattern: str) -> bool:
    """Whether `pattern` selects `name` (see the module docstring)."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def exact_pattern(name: str) -> str:
    """A pattern that matches `name` and nothing else: a glob (so it must match the whole
    name) with its special characters escaped as one-character sets, e.g. "[m]odel.norm"."""
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in name)
    if escaped != name:
        return escaped
    # no glob character yet: make one of a plain character (not one a set treats specially)
    i = next((i for i, c in enumerate(name) if c not in "!^]-"), None)
    return name if i is None else f"{name[:i]}[{name[i]}]{name[i + 1:]}"


def pattern_list(patterns: Patterns) -> list[str] | None:
    """`patterns` as a list (None stays None); OptionError for anything but strings."""
    if patterns is None:
        return None
    found = [patterns] if isinstance(patterns, str) else list(patterns)
    for p in found:
        if not isinstance(p, str):
            raise OptionError(f"name pattern {p!r}: expected a string such as 'mlp' or "
                              "'model.layers.*'")
    return found


def name_filter(include: Patterns = None, exclude: Patterns = None) -> Callable[[str], bool]:
    """A predicate: True for names matched by some `include` pattern (all names when include
    is None) and by no `exclude` pattern."""
    inc, exc = pattern_list(include), pattern_list(exclude) or []

    def keep(name: str) -> bool:
        if inc is not None and not any(matches(name, p) for p in inc):
            return False
        return not any(matches(name, p) for p in exc)

    return keep


def check_alpha_rule(rule: AlphaRule, names: Iterable[str] = ()) -> AlphaRule:
    """The rule with every number checked, once, before any work: a float, or each value of
    a mapping (naming the first of `names` that takes its alpha from that pattern, else the
    pattern alone). A function is checked per name, as `alpha_for` calls it."""
    if callable(rule) and not isinstance(rule, Mapping):
        return rule
    if not isinstance(rule, Mapping):
        return check_alpha(rule)
    pattern_list(list(rule))  # the patterns must be strings
    first_user: dict[str, str] = {}
    for name in names:
        pattern = next((p for p in rule if matches(name, p)), None)
        if pattern is not None:
            first_user.setdefault(pattern, name)
    checked = {}
    for pattern, value in rule.items():
        user = first_user.get(pattern)
        where = (f"alpha for {user!r} (pattern {pattern!r})" if user is not None
                 else f"alpha for pattern {pattern!r}")
        checked[pattern] = check_alpha(value, where)
    return checked


def alpha_for(rule: AlphaRule, name: str) -> float | None:
    """The alpha a rule checked by `check_alpha_rule` gives `name`: the float itself, the
    value of the first matching pattern of a mapping (in its order), or what a function
    returns, checked (None: do not merge this tensor). Raises AlphaError when a mapping
    has no pattern for the name."""
    if isinstance(rule, Mapping):
        for pattern, value in rule.items():
            if matches(name, pattern):
                return value
        raise AlphaError(f"no alpha pattern matches tensor {name!r}; patterns are "
                         f"{list(rule)}; add a catch-all such as '*': 0.9")
    if callable(rule):
        value = rule(name)
        return None if value is None else check_alpha(value, f"alpha for {name!r}")
    return rule
