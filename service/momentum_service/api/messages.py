"""Validation errors in plain words: what is wrong, what is allowed, and where (``loc``).

pydantic's own messages are written for Python developers ("Input should be greater than or
equal to 0", "Extra inputs are not permitted") and its locations name the internals of a
union (``["optimizer", "pytorch", "lr"]``, ``"constrained-float"``, ``"none"``,
``"tagged-union[...]"``). Here each error becomes ``{"loc": [...], "msg": ...}`` where ``loc``
is the path of the user's own field in what they sent, and ``msg`` names that field, says
what it must be, and what it got (cut short, never a long regular expression).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

# What a string field with a pattern must look like, by field name (instead of the regex).
PATTERN_HELP = {
    "model": "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
    "name": "1 to 256 letters, digits, '.', '_', ':' or '-', starting with a letter, digit or '_'",
    "names": "a comma-separated list of parameter names (each 1 to 256 letters, digits, '.', '_', ':' or '-', "
    "starting with a letter, digit or '_')",
    "include": "'state' and/or 'velocity', comma-separated",
    "If-None-Match": "'*' (create only)",
    "metric": "1 to 64 letters, digits, '.', '_', ':', '/' or '-', starting with a letter or '_'",
    "group": "1 to 128 letters, digits, '.', '_', ':' or '-', starting with a letter, digit or '_'",
}

_TYPE_NAMES = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a JSON object",
    "list_type": "a JSON array",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
    "finite_number": "a finite number",
}

_MAX_SHOWN = 60
_RULES = "one of pytorch, keras, tf1, ema, previous_delta"


def shown(value: Any) -> str:
    """A short rendering of what the user sent, for a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def user_loc(loc: tuple[Any, ...] | list[Any], data: Any, *, keep_last: bool) -> list[Any]:
    """``loc`` without what is not a key of ``data`` (the names pydantic gives union members).

    ``keep_last`` keeps a last element that is not in ``data`` (a missing field is named there).
    """
    out: list[Any] = []
    node: Any = data
    for i, part in enumerate(loc):
        if _has(node, part):
            out.append(part)
            node = node[part]
        elif keep_last and i == len(loc) - 1 and isinstance(part, str) and not _is_tag(part):
            out.append(part)
    return out


def _has(node: Any, part: Any) -> bool:
    """Whether ``part`` is a key of the JSON object, or an index into the JSON array, ``node``."""
    if isinstance(node, dict):
        return isinstance(part, str) and part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _is_tag(part: str) -> bool:
    return part in ("none", "str", "int", "float", "bool") or bool(_UNION_TAG.match(part))


# How pydantic names union members in a ``loc``: ``tagged-union[...]``, ``function-after[...]``,
# ``constrained-float``, ``list[float]``.
_UNION_TAG = re.compile(r"^[a-z-]+\[.*\]$|^constrained-")


def _fields_of(model: type[BaseModel] | None, loc: list[Any]) -> list[str] | None:
    """The fields of the object at ``loc`` in ``model``, when that object is a model (best effort)."""
    node: Any = model
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        annotation = node.model_fields[part].annotation
        node = annotation if isinstance(annotation, type) else None
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return None


def message(error: Mapping[str, Any], loc: list[Any], model: type[BaseModel] | None) -> str:
    """One pydantic error in plain words, naming the field at ``loc``."""
    kind, ctx, value = error.get("type", ""), error.get("ctx") or {}, error.get("input")
    field = _path([p for p in loc if p not in ("body", "query", "path", "header")]) or "the body"
    name = str(loc[-1]) if loc else "body"
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        where = _path([p for p in loc[:-1] if p != "body"]) or "the body"
        has = _fields_of(model, [p for p in loc[:-1] if p != "body"])
        listed = f"; it has: {', '.join(has)}" if has else ""
        return f"{where} has no field {name!r}{listed}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"{field} must be {op} {bound}, got {shown(value)}"
    if kind == "literal_error":
        return f"{field} must be {ctx.get('expected', 'one of the allowed values')}, got {shown(value)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ctx.get("expected_tags", "")
        key = ctx.get("discriminator", "'type'").strip("'")
        got = ctx.get("tag")
        return f"{field}.{key} must be one of {tags}" + (f", got {shown(got)}" if got is not None else "")
    if kind == "invalid_rule":
        return f"{field} must be a JSON object whose rule is {_RULES} (default pytorch), got {shown(value)}"
    if kind == "string_pattern_mismatch" and error.get("loc", ())[-1:] == ("[key]",):
        where = _path([p for p in loc[:-1] if p != "body"]) or "the body"
        what = {"metrics": "metric", "groups": "group"}.get(str(loc[-2]) if len(loc) > 1 else "", "name")
        noun = "parameter" if what == "name" else what
        return f"{where} has an invalid {noun} name {shown(value)}: a name is {PATTERN_HELP[what]}"
    if kind == "string_pattern_mismatch":
        return f"{field} must be {PATTERN_HELP.get(name, 'of the documented form')}, got {shown(value)}"
    if kind in ("too_short", "too_long"):
        size = ctx.get("min_length" if kind == "too_short" else "max_length")
        what = "at least" if kind == "too_short" else "at most"
        unit = "item" if size == 1 else "items"
        return f"{field} must have {what} {size} {unit}, got {ctx.get('actual_length', '?')}"
    if kind in ("string_too_short", "string_too_long"):
        size = ctx.get("min_length" if kind == "string_too_short" else "max_length")
        return f"{field} must be {'at least' if kind == 'string_too_short' else 'at most'} {size} characters long"
    if kind in _TYPE_NAMES:
        return f"{field} must be {_TYPE_NAMES[kind]}, got {shown(value)}"
    if kind == "none_required":
        return f"{field} must be left out, got {shown(value)}"
    return f"{field}: {error.get('msg', 'not valid')}"


def explain(
    errors: Sequence[Mapping[str, Any]], data: Any, prefix: list[Any], model: type[BaseModel] | None = None
) -> list[dict[str, Any]]:
    """pydantic's ``errors`` (with ``input`` and ``ctx``) for ``data`` sent at ``prefix``, in plain words.

    The union branch that only accepts ``null`` (an optional field) is dropped when another branch
    says what is wrong; repeated messages are dropped.
    """
    located = []
    for e in errors:
        keep_last = e.get("type") == "missing"
        located.append((e, [*prefix, *user_loc(e.get("loc", ()), data, keep_last=keep_last)]))
    substantive = {tuple(loc) for e, loc in located if e.get("type") != "none_required"}
    out, seen = [], set()
    for e, loc in located:
        if e.get("type") == "none_required" and any(s[: len(loc)] == tuple(loc) for s in substantive):
            continue
        msg = message(e, loc, model)
        if (tuple(loc), msg) in seen:
            continue
        seen.add((tuple(loc), msg))
        out.append({"loc": loc, "msg": msg, "type": e.get("type", "")})
    return out


def summary(errors: list[dict[str, Any]], limit: int = 3) -> str:
    """A ``detail`` that says what is wrong: the first messages, and how many more there are."""
    msgs = [e["msg"] for e in errors[:limit]]
    more = len(errors) - limit
    return "; ".join(msgs) + (f"; and {more} more (see errors)" if more > 0 else "")
