"""The one canonical msgpack encoding for everything gpumesh signs, hashes or stores.

A frozen dataclass encodes as a msgpack array of its field values in declaration order; the
decoder rebuilds it from the class's type hints, checking every value's type, and rejects any
input that does not re-encode to exactly the same bytes. So one object has one encoding, and a
hash or signature over the bytes is a hash or signature over the object.

Supported field types: ``int`` (never ``bool``), ``bool``, ``str``, ``bytes``, ``None``,
``X | None``, ``tuple[X, ...]``, fixed ``tuple[X, Y]``, ``enum.IntEnum``, ``NewType`` over any
of these, and nested frozen dataclasses. Dicts are not supported: their order is not canonical.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import threading
import types
import typing
from typing import Any, TypeVar

import msgpack

from ledger.exceptions import DecodeError, LedgerError

T = TypeVar("T")

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
message_bytes_max = 4 * 1024 * 1024
"""Largest encoded object the decoder accepts unless the caller passes a smaller cap."""


_field_names: dict[type, tuple[str, ...] | None] = {}


def _dataclass_fields(cls: type) -> tuple[str, ...] | None:
    """A dataclass's field names in order (None for any other class), cached per class:
    ``dataclasses.fields`` costs more than the encoding itself on the hot path."""
    try:
        return _field_names[cls]
    except KeyError:
        names = (
            tuple(f.name for f in dataclasses.fields(cls))
            if dataclasses.is_dataclass(cls)
            else None
        )
        _field_names[cls] = names
        return names


def to_plain(value: Any) -> Any:
    """Turn a dataclass tree into msgpack-ready lists, ints, bytes and strings."""
    cls = type(value)
    if cls is bytes or cls is str:
        return value
    if cls is int:
        if not INT_MIN <= value <= INT_MAX:
            raise OverflowError(f"integer {value} does not fit in 64 bits")
        return value
    names = _dataclass_fields(cls)
    if names is not None:
        return [to_plain(getattr(value, name)) for name in names]
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise OverflowError(f"integer {value} does not fit in 64 bits")
        return int(value)
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    raise TypeError(f"cannot encode {type(value).__name__} canonically")


_thread_packers = threading.local()


def _pack_default(value: Any) -> Any:
    """msgpack's hook for what it does not pack itself (with ``strict_types``): dataclasses
    become arrays of their fields, tuples arrays, int enums ints. msgpack recurses in C."""
    cls = type(value)
    names = _dataclass_fields(cls)
    if names is not None:
        return [getattr(value, name) for name in names]
    if cls is tuple:
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"cannot encode {cls.__name__} canonically")


def encode(value: Any) -> bytes:
    """The canonical bytes of ``value`` (a frozen dataclass, or a plain value).

    The same bytes as ``msgpack.packb(to_plain(value))``, several times faster. Types are
    checked on the way in (``decode``), not here: encode what the type hints promise.
    """
    packer = getattr(_thread_packers, "packer", None)
    if packer is None:
        # One reusable Packer per thread: msgpack.packb builds a new one per call, which cost
        # as much as the packing itself; a Packer is not safe to share between threads.
        packer = msgpack.Packer(use_bin_type=True, strict_types=True, default=_pack_default)
        _thread_packers.packer = packer
    try:
        packed: bytes = packer.pack(value)
    except OverflowError as exc:
        packer.reset()
        raise OverflowError(f"an integer does not fit in 64 bits: {exc}") from exc
    except TypeError:
        packer.reset()  # leave no half-packed bytes for the next call on this thread
        raise
    return packed


def encode_with(value: Any, **overrides: Any) -> bytes:
    """``encode(dataclasses.replace(value, **overrides))`` without building the copy."""
    names = _dataclass_fields(type(value))
    assert names is not None, "encode_with takes a dataclass"
    return encode([overrides[n] if n in overrides else getattr(value, n) for n in names])


def digest(data: bytes) -> bytes:
    """SHA-256 of ``data``: the hash every id and root in gpumesh is made of."""
    return hashlib.sha256(data).digest()


def hash_of(value: Any) -> bytes:
    """SHA-256 of the canonical encoding of ``value``."""
    return digest(encode(value))


_hints_cache: dict[type, list[tuple[str, Any]]] = {}


def _field_hints(cls: type) -> list[tuple[str, Any]]:
    cached = _hints_cache.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init]
        _hints_cache[cls] = cached
    return cached


_tagged_cache: dict[Any, dict[int, type] | None] = {}


def _tagged_variants(tp: Any, args: tuple[Any, ...]) -> dict[int, type] | None:
    """For a union of dataclasses that each declare ``KIND: ClassVar[int]`` and a first field
    ``kind``: the map from kind number to class. None for any other union."""
    if tp in _tagged_cache:
        return _tagged_cache[tp]
    variants: dict[int, type] | None = {}
    for arg in args:
        kind = getattr(arg, "KIND", None)
        if not (isinstance(arg, type) and dataclasses.is_dataclass(arg) and isinstance(kind, int)):
            variants = None
            break
        assert variants is not None
        assert dataclasses.fields(arg)[0].name == "kind", f"{arg.__name__}: kind must come first"
        assert kind not in variants, f"two variants share kind {kind}"
        variants[int(kind)] = arg
    _tagged_cache[tp] = variants
    return variants


class _Mismatch(Exception):
    """A compiled decoder's failure; carries the path from the failing value up to the root."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.parts: list[str] = []


Decoder = typing.Callable[[Any], Any]
_compiled: dict[Any, Decoder] = {}


def _decoder(tp: Any) -> Decoder:
    """A function that checks msgpack-decoded data and rebuilds it as ``tp``. Every type
    question is answered once per type, when the decoder is built, not once per value."""
    found = _compiled.get(tp)
    if found is None:
        found = _compile(tp)
        _compiled[tp] = found
    return found


def _type_check(kind: type, label: str) -> Decoder:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise _Mismatch(f"expected {label}, got {type(value).__name__}")
        return value

    return check


def _compile(tp: Any) -> Decoder:
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:  # typing.NewType
        return _decoder(supertype)
    if tp is Any:
        return lambda value: value
    if tp is type(None) or tp is None:
        return _type_check(type(None), "nil")
    if tp is bool:
        return _type_check(bool, "bool")
    if tp is int:
        return _type_check(int, "int")  # msgpack yields exact ints; bools are not ints here
    if tp is str:
        return _type_check(str, "str")
    if tp is bytes:
        return _type_check(bytes, "bytes")
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        members = {int(m): m for m in tp}
        name = tp.__name__

        def enum_member(value: Any) -> Any:
            if type(value) is not int:
                raise _Mismatch(f"expected {name}, got {type(value).__name__}")
            member = members.get(value)
            if member is None:
                raise _Mismatch(f"{value} is not a valid {name}")
            return member

        return enum_member
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _compile_dataclass(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _compile_union(tp, args)
    if origin is tuple:
        return _compile_tuple(args)
    if origin is typing.Literal:

        def literal(value: Any) -> Any:
            if value not in args:
                raise _Mismatch(f"{value!r} is not one of {args}")
            return value

        return literal
    raise TypeError(f"type {tp!r} is not supported by the canonical codec")


def _compile_dataclass(cls: type) -> Decoder:
    hints = _field_hints(cls)
    names = [name for name, _ in hints]
    count = len(hints)
    label = f"expected {cls.__name__} with {count} fields"
    # Filled in on first use: a dataclass may refer to itself or to one not compiled yet.
    field_decoders: list[Decoder] = []

    def build(value: Any) -> Any:
        if type(value) is not list or len(value) != count:
            raise _Mismatch(label)
        if not field_decoders:
            field_decoders.extend(_decoder(hint) for _, hint in hints)
        kwargs = {}
        for name, decode_field, item in zip(names, field_decoders, value, strict=True):
            try:
                kwargs[name] = decode_field(item)
            except _Mismatch as exc:
                exc.parts.append(f".{name}")
                raise
        try:
            return cls(**kwargs)
        except (ValueError, TypeError, LedgerError) as exc:  # __post_init__ refused the values
            raise _Mismatch(f"invalid {cls.__name__}: {exc}") from exc

    return build


def _compile_union(tp: Any, args: tuple[Any, ...]) -> Decoder:
    tagged = _tagged_variants(tp, args)
    if tagged is not None:
        variants = {kind: _decoder(cls) for kind, cls in tagged.items()}

        def by_kind(value: Any) -> Any:
            if type(value) is not list or not value or type(value[0]) is not int:
                raise _Mismatch("expected an array that starts with a kind number")
            variant = variants.get(value[0])
            if variant is None:
                raise _Mismatch(f"unknown kind {value[0]}")
            return variant(value)

        return by_kind
    options = [_decoder(arg) for arg in args]

    def first_match(value: Any) -> Any:
        errors = []
        for option in options:
            try:
                return option(value)
            except _Mismatch as exc:
                errors.append("$" + "".join(reversed(exc.parts)) + ": " + exc.message)
        raise _Mismatch(f"no variant matched ({'; '.join(errors)})")

    return first_match


def _compile_tuple(args: tuple[Any, ...]) -> Decoder:
    if len(args) == 2 and args[1] is Ellipsis:
        item_decoder = _decoder(args[0])

        def homogeneous(value: Any) -> Any:
            if type(value) is not list:
                raise _Mismatch(f"expected array, got {type(value).__name__}")
            items = []
            for index, item in enumerate(value):
                try:
                    items.append(item_decoder(item))
                except _Mismatch as exc:
                    exc.parts.append(f"[{index}]")
                    raise
            return tuple(items)

        return homogeneous
    decoders = [_decoder(a) for a in args]

    def fixed(value: Any) -> Any:
        if type(value) is not list:
            raise _Mismatch(f"expected array, got {type(value).__name__}")
        if len(value) != len(decoders):
            raise _Mismatch(f"expected {len(decoders)} items, got {len(value)}")
        items = []
        for index, (decode_item, item) in enumerate(zip(decoders, value, strict=True)):
            try:
                items.append(decode_item(item))
            except _Mismatch as exc:
                exc.parts.append(f"[{index}]")
                raise
        return tuple(items)

    return fixed


def decode_plain(tp: Any, value: Any) -> Any:
    """Rebuild a value of type ``tp`` from msgpack-decoded data, checking every type."""
    try:
        return _decoder(tp)(value)
    except _Mismatch as exc:
        path = "$" + "".join(reversed(exc.parts))
        raise DecodeError(f"{path}: {exc.message}") from None


def unpack(data: bytes, *, max_bytes: int = message_bytes_max) -> Any:
    """Parse msgpack bytes with every size bounded; no maps, no extension types."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not valid msgpack: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 in a string: {exc}") from exc


def decode(cls: type[T], data: bytes, *, max_bytes: int = message_bytes_max) -> T:
    """Decode canonical bytes into ``cls``; raise ``DecodeError`` on anything else."""
    value: T = decode_plain(cls, unpack(data, max_bytes=max_bytes))
    if encode(value) != bytes(data):
        raise DecodeError(f"{getattr(cls, '__name__', cls)}: bytes are not in canonical form")
    return value
