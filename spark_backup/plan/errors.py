"""Plan validation errors as one line: every error, unknown fields first (a misspelled key is
the usual cause of a "field required" beside it), each with a did-you-mean hint where a known
field or kind is close.

``sources[0].cadance: unknown field (did you mean 'cadence'?); sources[0].cadence: field required``
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

# More errors than this are counted, not listed: the line must stay readable.
MAX_LISTED = 8


def describe_validation_error(
    exc: ValidationError, data: Any, model: type[BaseModel] | None = None
) -> str:
    errors = sorted(
        exc.errors(include_url=False), key=lambda error: error["type"] != "extra_forbidden"
    )
    described = [_describe(error, data, model) for error in errors[:MAX_LISTED]]
    more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
    return "; ".join(dict.fromkeys(described)) + more


def _describe(error: Mapping[str, Any], data: Any, model: type[BaseModel] | None) -> str:
    loc = tuple(error["loc"])
    path, parent = _field_path(loc, data, model)
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        path = f"{path}.kind" if path else "kind"
    message = _expectation(error)
    if kind == "extra_forbidden" and parent is not None:
        message += _did_you_mean(str(loc[-1]), list(parent.model_fields))
    elif kind == "union_tag_invalid":
        expected = [t.strip(" '") for t in error.get("ctx", {}).get("expected_tags", "").split(",")]
        message += _did_you_mean(str(error.get("ctx", {}).get("tag")), expected)
    return f"{path}: {message}" if path else message


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_path(
    loc: tuple[Any, ...], data: Any, model: type[BaseModel] | None
) -> tuple[str, type[BaseModel] | None]:
    """The error's location as the plan writes it (``sources[0].paths``), and the model that
    holds its last field, if it can be told."""
    parts: list[str] = []
    node, annotation = data, model
    parent: type[BaseModel] | None = None
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            annotation = _descend(annotation, item)
            continue
        tagged = _union_member(annotation, item)
        if tagged is not None and not (isinstance(node, Mapping) and item in node):
            # Discriminated unions add the tag ('config_archive', 's3') to the location.
            annotation = tagged
            continue
        parent = _model_of(annotation)
        parts.append(f".{item}" if parts else str(item))
        node = node.get(item) if isinstance(node, Mapping) else None
        annotation = _descend(annotation, item)
    return "".join(parts), parent


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> tuple[Any, ...]:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(_unwrap(a) for a in typing.get_args(annotation))
    return (annotation,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _union_member(annotation: Any, tag: Any) -> type[BaseModel] | None:
    """The member of a discriminated union whose ``kind`` is ``tag``."""
    members = _members(annotation)
    if len(members) < 2:
        return None
    for member in members:
        if (
            isinstance(member, type)
            and issubclass(member, BaseModel)
            and "kind" in member.model_fields
        ) and tag in typing.get_args(member.model_fields["kind"].annotation):
            return member
    return None


def _descend(annotation: Any, item: Any) -> Any:
    if annotation is None:
        return None
    if isinstance(item, int):
        for member in _members(annotation):
            if typing.get_origin(member) is list:
                return typing.get_args(member)[0]
        return None
    found = _model_of(annotation)
    if found is None or item not in found.model_fields:
        return None
    return found.model_fields[item].annotation


def _expectation(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag")
        expected = error.get("ctx", {}).get("expected_tags", "")
        return f"unknown kind {tag!r} (expected one of: {expected.replace(chr(39), '')})"
    if kind == "union_tag_not_found":
        return "field required"
    message = str(error["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
