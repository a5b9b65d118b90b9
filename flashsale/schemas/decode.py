"""Reading a request body into its shape, and the contract's 400 when it does not fit.

``BodyReader(Shape)(raw)`` is the one way a handler reads a JSON body:
msgspec decodes the bytes straight into the Struct in strict mode (no
intermediate dict; measured ~0.1 µs for ``{"quantity":1}`` against ~0.7 µs
for orjson + the hand-written checks it replaced). A failure becomes
``InvalidRequest`` whose message names the field and the rule, read from
the shape's own declaration (its bounds, its Literal values), never echoing
the input. Only failures pay for building the message.

Integers are JSON Schema's: a number with a zero fraction is that integer
(``2.0``, ``2e0`` and ``2`` are the same request), while ``2.5``, ``"2"`` and
``true`` are not integers. msgspec's strict mode refuses ``2.0``; only a body
it refused for a float where it wanted an integer pays for the second look
(``_whole_floats_as_ints``, then the same strict decoder again).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, Generic, TypeVar

import msgspec
from msgspec import inspect as mi

from flashsale.errors import InvalidRequest
from flashsale.schemas.fields import ENUM_ORDER

T = TypeVar("T")

NOT_OBJECT: Final = "the request body must be a JSON object"
NOT_JSON: Final = "the request body is not valid JSON"
_AT: Final = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_QUOTED: Final = re.compile(r"`([^`]*)`")
_GOT_FLOAT: Final = "got `float`"
_KINDS: Final = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
    "object": "an object", "array": "an array",
}


class BodyReader(Generic[T]):
    """Decodes raw request bodies into ``shape`` (a Struct, or any type msgspec decodes);
    ``empty_ok``: no body at all reads as ``{}`` would."""

    __slots__ = ("_decoder", "_empty", "shape")

    def __init__(self, shape: type[T], *, empty_ok: bool = False) -> None:
        self.shape = shape
        self._decoder = msgspec.json.Decoder(shape)
        self._empty: T | None = self._decoder.decode(b"{}") if empty_ok else None

    def __call__(self, raw: bytes) -> T:
        try:
            return self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            error = str(exc)
        except msgspec.DecodeError:
            if raw.strip():
                raise InvalidRequest(NOT_JSON) from None
            if self._empty is None:
                raise InvalidRequest(NOT_OBJECT) from None
            return self._empty
        if _GOT_FLOAT in error:  # 2.0 where an integer goes? JSON Schema's integer
            respelled = _whole_floats_as_ints(raw)
            if respelled is not None:
                try:
                    return self._decoder.decode(respelled)
                except msgspec.ValidationError as exc:
                    error = str(exc)
        raise InvalidRequest(message(self.shape, error, raw))


def _whole_floats_as_ints(raw: bytes) -> bytes | None:
    """``raw`` with every number that has a zero fraction written as the integer
    it is (a float-typed field takes the integer alike); None when ``raw`` is not
    JSON a plain decode can read. Iterative: the body is at most MAX_BODY_BYTES."""
    try:
        root: Any = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    holder = [root]
    stack: list[Any] = [holder]
    while stack:
        node = stack.pop()
        for key, value in list(node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            elif isinstance(value, dict | list):
                stack.append(value)
    return msgspec.json.encode(holder[0])


def message(shape: type[Any], error: str, raw: bytes) -> str:
    """Our message for msgspec's ``error`` decoding ``raw`` into ``shape``."""
    m = _AT.match(error)
    assert m is not None  # the pattern matches any text
    what, path = m["what"], (m["path"] or "").lstrip(".")
    quoted = _QUOTED.findall(what)
    name = path or "the request body"
    info = _field_type(shape, path)
    if what.startswith("Object contains unknown field"):
        return _unknown(shape, path, raw, quoted)
    if what.startswith("Object missing required field"):
        return f"{_join(path, quoted[0])} is required"
    if what.startswith("Invalid enum value"):
        return f"{name} must be one of {', '.join(str(v) for v in _choices(info))}"
    if what.startswith("Expected") and quoted:
        if not path and quoted[0] == "object":
            return NOT_OBJECT
        if len(quoted) > 1 and quoted[1] == "null":
            return f"{name} must not be null"
        if " got " in what:
            kind = " or ".join(_KINDS.get(k.strip(), k.strip()) for k in quoted[0].split("|"))
            return f"{name} must be {kind}"
        return _bound(name, info)
    return what  # raised by a shape's __post_init__: our own words


def _choices(info: mi.Type | None) -> tuple[object, ...]:
    if isinstance(info, mi.Metadata):
        listed = (info.extra_json_schema or {}).get(ENUM_ORDER)  # declared order (fields.choice)
        return tuple(listed) if listed else _choices(info.type)
    return info.values if isinstance(info, mi.LiteralType) else ()


def _bound(name: str, info: mi.Type | None) -> str:
    if isinstance(info, mi.Metadata):
        return _bound(name, info.type)
    if isinstance(info, mi.IntType | mi.FloatType):
        lo, hi = info.ge, info.le
        if lo is not None and hi is not None:
            return f"{name} must be between {lo} and {hi}"
        return f"{name} must be at least {lo}" if lo is not None else f"{name} must be at most {hi}"
    if isinstance(info, mi.StrType):
        return f"{name} must be {info.min_length or 0}-{info.max_length} characters"
    return f"{name} is out of range"


def _struct_of(t: mi.Type | None) -> mi.StructType | None:
    if isinstance(t, mi.Metadata):
        return _struct_of(t.type)
    if isinstance(t, mi.StructType):
        return t
    if isinstance(t, mi.UnionType):
        return next((s for s in t.types if isinstance(s, mi.StructType)), None)
    return None


def _field_type(shape: type[Any], path: str) -> mi.Type | None:
    """The declared type at ``path`` (``a.b``) of ``shape``; a union narrowed to its
    non-null member."""
    t: mi.Type | None = mi.type_info(shape)
    for part in path.split(".") if path else ():
        struct = _struct_of(t)
        field = next((f for f in struct.fields if f.encode_name == part), None) if struct else None
        t = field.type if field else None
    if isinstance(t, mi.UnionType):
        rest = [u for u in t.types if not isinstance(u, mi.NoneType)]
        t = rest[0] if len(rest) == 1 else t
    return t  # a Metadata (Annotated) wrapper stays: it holds the declared enum order


def _unknown(shape: type[Any], path: str, raw: bytes, first: list[str]) -> str:
    """Every unknown field of the object at ``path``, sorted (msgspec stops at the first)."""
    names = set(first[:1])
    struct = _struct_of(_field_type(shape, path))
    try:
        value: Any = json.loads(raw)
        for part in path.split(".") if path else ():
            value = value[part]
    except (ValueError, RecursionError, KeyError, TypeError):
        value = None
    if struct is not None and isinstance(value, dict):
        names |= set(value) - {f.encode_name for f in struct.fields}
    where = f" in {path}" if path else ""
    return f"unknown field(s){where}: {', '.join(sorted(names))}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
