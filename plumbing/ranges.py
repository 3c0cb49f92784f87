"""plumbing/ranges.py: what a config field accepts, read from its declaration.

Each config field is declared `name: Annotated[type, "rule"] = default`, so its valid values stand
on the line that defines it. config.check reads every declaration; the rules are
  ">= 1", "> 0", "in [0, 1)", ...   a finite number in that range (an int where the type is int)
  "finite"                          any finite number
  "cosine|constant"                 one of these values
  "a power of 2"                    1, 2, 4, 8, ...
  "each > 0", "each in (0, 1]"      a non-empty list whose every item passes the rule after "each"
  "any"                             any value of the field's type (a path, a device, a switch)
and config.cross_rules adds what depends on two fields (a block index below the depth, ...).
"""
import dataclasses
import math
import re

_COMPARE = {">=": lambda v, x: v >= x, ">": lambda v, x: v > x, "<=": lambda v, x: v <= x,
            "<": lambda v, x: v < x}


def declared(section):
    """[(field name, its type, its rule)] of a config dataclass, in definition order."""
    out = []
    for f in dataclasses.fields(section):
        if getattr(f.type, "__metadata__", None) is None:
            raise TypeError(f"{type(section).__name__}.{f.name} declares no range: define it as "
                            f"{f.name}: Annotated[type, \"rule\"] (see plumbing/ranges.py)")
        out.append((f.name, f.type.__origin__, f.type.__metadata__[0]))
    return out


def _is_number(value, typ):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if typ is int else math.isfinite(value)


def accepts(rule, value, typ):
    """Whether `value` (of a field of type `typ`) passes a declared rule."""
    if rule.startswith("each "):
        return (isinstance(value, (list, tuple)) and len(value) > 0
                and all(accepts(rule[5:], v, float) for v in value))
    if typ in (list, tuple):
        return isinstance(value, (list, tuple))
    if rule == "any":
        return isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
    if "|" in rule:
        return ((isinstance(value, str) if typ is str else _is_number(value, typ))
                and str(value) in rule.split("|"))
    if not _is_number(value, typ):
        return False
    if rule == "finite":
        return True
    if rule == "a power of 2":
        return value >= 1 and value & (value - 1) == 0
    if m := re.fullmatch(r"(>=|>|<=|<) (\S+)", rule):
        return _COMPARE[m[1]](value, float(m[2]))
    if m := re.fullmatch(r"in ([\[(])(\S+), (\S+)([\])])", rule):
        lo, hi = float(m[2]), float(m[3])
        return ((lo <= value if m[1] == "[" else lo < value)
                and (value <= hi if m[4] == "]" else value < hi))
    raise ValueError(f"unknown rule {rule!r}")


def want(rule, typ, value):
    """A rule as the error message says it (with the type, where the value has the wrong one)."""
    if rule.startswith("each "):
        return f"one or more numbers, each {want(rule[5:], float, 0.0)}"
    if rule == "any" or typ in (list, tuple):
        return f"a {typ.__name__}"
    if "|" in rule:
        *first, last = rule.split("|")
        return f"{', '.join(first)} or {last}"
    if not _is_number(value, typ):
        return (f"{'an integer' if typ is int else 'a finite number'}"
                f"{'' if rule == 'finite' else ' ' + rule}")
    return rule


def show(value):
    if type(value) not in (int, float, bool, str, list, tuple):    # e.g. numpy.float32(0.001)
        return f"{value!r} (a {type(value).__module__}.{type(value).__name__}, not a Python number)"
    return repr(value) if isinstance(value, str) else value
