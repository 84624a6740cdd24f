"""msgpack framing shared by every dsys wire protocol.

Two layers:

* :func:`encode` / :func:`decode` turn plain values (dicts, lists, bytes, str,
  ints, floats, bools, None) into msgpack bytes and back, refusing frames larger
  than ``max_size`` and translating every msgpack failure into
  :class:`~dsys.errors.RemoteProtocolError` with a message that says what was wrong.
* :class:`MessageCodec` maps frozen dataclasses to an envelope
  ``{"t": tag, "v": version, **fields}`` and back, checking on decode that the tag
  is known, no field is missing or unknown, and each field has the declared type.

Example::

    codec = MessageCodec()

    @codec.register("ping")
    @dataclass(frozen=True, slots=True)
    class Ping:
        seq: int

    data = codec.encode(Ping(seq=1))
    assert codec.decode(data) == Ping(seq=1)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgpack

from dsys.errors import ConfigError, LocalProtocolError, RemoteProtocolError

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
"""Default upper bound on one encoded frame, in bytes (4 MiB)."""

# Nesting deeper than this is refused on decode: no legitimate dsys frame needs it,
# and it bounds the recursion a hostile peer can cause.
_MAX_DEPTH = 32

T = TypeVar("T")


def encode(value: object, *, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode a plain value to msgpack bytes.

    Raises:
        LocalProtocolError: the value has a type msgpack cannot carry, or the
            encoded frame is larger than ``max_size``.
    """
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode value: {exc}") from exc
    if len(data) > max_size:
        raise LocalProtocolError(f"frame of {len(data)} bytes exceeds the limit of {max_size}")
    return data


def decode(data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_FRAME) -> Any:
    """Decode one msgpack frame, refusing oversized, truncated or trailing-garbage input.

    Maps decode with string keys or integer keys only; msgpack extension types are
    refused.

    Raises:
        RemoteProtocolError: the frame is too large, malformed, or not exactly one value.
    """
    size = len(data)
    if size > max_size:
        raise RemoteProtocolError(f"frame of {size} bytes exceeds the limit of {max_size}")
    if size == 0:
        raise RemoteProtocolError("empty frame")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
        )
    except msgpack.ExtraData as exc:
        raise RemoteProtocolError("trailing bytes after the msgpack value") from exc
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed msgpack frame: {exc}") from exc


def _refuse_ext(code: int, data: bytes) -> object:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


class MessageCodec:
    """Encodes registered frozen dataclasses as tagged msgpack envelopes and back.

    Args:
        max_size: largest frame accepted or produced, in bytes.
        version: protocol version written into every envelope as ``"v"``; decode
            refuses envelopes whose version differs.
    """

    def __init__(self, *, max_size: int = DEFAULT_MAX_FRAME, version: int = 1) -> None:
        if max_size <= 0:
            raise ConfigError(f"max_size must be positive, got {max_size}")
        self.max_size = max_size
        self.version = version
        self._by_tag: dict[str, type[Any]] = {}
        self._by_type: dict[type[Any], str] = {}
        self._hints: dict[type[Any], dict[str, Any]] = {}

    def register(self, tag: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register a dataclass under ``tag`` (unique per codec)."""

        def deco(cls: type[T]) -> type[T]:
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"{cls.__name__} is not a dataclass")
            if tag in self._by_tag:
                raise ConfigError(f"tag {tag!r} is already registered")
            self._by_tag[tag] = cls
            self._by_type[cls] = tag
            return cls

        return deco

    @property
    def tags(self) -> Mapping[str, type[Any]]:
        """The registered tags and their classes."""
        return dict(self._by_tag)

    # -- encoding -----------------------------------------------------------------

    def to_plain(self, obj: object) -> Any:
        """Turn a registered dataclass (possibly nested in lists/dicts) into plain values."""
        tag = self._by_type.get(type(obj))
        if tag is not None:
            out: dict[str, Any] = {"t": tag, "v": self.version}
            for f in dataclasses.fields(obj):  # type: ignore[arg-type]
                out[f.name] = self.to_plain(getattr(obj, f.name))
            return out
        if isinstance(obj, list | tuple):
            return [self.to_plain(x) for x in obj]
        if isinstance(obj, dict):
            return {k: self.to_plain(v) for k, v in obj.items()}
        if dataclasses.is_dataclass(obj):
            raise LocalProtocolError(f"{type(obj).__name__} is not registered with this codec")
        return obj

    def encode(self, obj: object) -> bytes:
        """Encode a registered dataclass to one msgpack frame."""
        return encode(self.to_plain(obj), max_size=self.max_size)

    # -- decoding -----------------------------------------------------------------

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode one frame into the registered dataclass it carries.

        Raises:
            RemoteProtocolError: malformed frame, unknown tag, wrong version, missing
                or unknown fields, or a field of the wrong type.
        """
        return self.from_plain(decode(data, max_size=self.max_size))

    def from_plain(self, value: Any) -> Any:
        """Turn a decoded envelope (a dict with ``"t"``) into its dataclass."""
        if not isinstance(value, dict):
            raise RemoteProtocolError(f"expected a message map, got {type(value).__name__}")
        return self._build(value, 0)

    def _build(self, env: dict[str, Any], depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise RemoteProtocolError("message nested too deeply")
        tag = env.get("t")
        if not isinstance(tag, str):
            raise RemoteProtocolError("message has no string tag 't'")
        cls = self._by_tag.get(tag)
        if cls is None:
            raise RemoteProtocolError(f"unknown message tag {tag!r}")
        version = env.get("v")
        if version != self.version:
            raise RemoteProtocolError(
                f"{tag}: protocol version {version!r} is not supported (want {self.version})"
            )
        hints = self._hints.get(cls)
        if hints is None:
            hints = typing.get_type_hints(cls)
            self._hints[cls] = hints
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(env) - names - {"t", "v"}
        if unknown:
            raise RemoteProtocolError(f"{tag}: unknown field(s) {sorted(map(str, unknown))}")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name not in env:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise RemoteProtocolError(f"{tag}: missing field {f.name!r}")
                continue
            kwargs[f.name] = self._convert(env[f.name], hints[f.name], f"{tag}.{f.name}", depth)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"{tag}: invalid message: {exc}") from exc

    def _convert(self, value: Any, hint: Any, where: str, depth: int) -> Any:
        if hint is Any or hint is object:
            return value
        origin = typing.get_origin(hint)
        if origin is typing.Union or origin is types.UnionType:
            errors = []
            for arm in typing.get_args(hint):
                try:
                    return self._convert(value, arm, where, depth)
                except RemoteProtocolError as exc:
                    errors.append(str(exc))
            raise RemoteProtocolError(f"{where}: {type(value).__name__} does not fit {hint}")
        if hint is type(None):
            if value is None:
                return None
            raise _wrong(where, "None", value)
        if origin in (list, tuple) or hint in (list, tuple):
            if not isinstance(value, list):
                raise _wrong(where, "a list", value)
            args = typing.get_args(hint)
            if origin is tuple:
                if len(args) == 2 and args[1] is Ellipsis:
                    return tuple(self._convert(v, args[0], where, depth) for v in value)
                if args and len(args) != len(value):
                    raise RemoteProtocolError(f"{where}: expected {len(args)} items")
                return (
                    tuple(
                        self._convert(v, a, where, depth) for v, a in zip(value, args, strict=False)
                    )
                    if args
                    else tuple(value)
                )
            if args:
                return [self._convert(v, args[0], where, depth) for v in value]
            return value
        if origin is dict or hint is dict:
            if not isinstance(value, dict):
                raise _wrong(where, "a map", value)
            args = typing.get_args(hint)
            if args:
                return {
                    self._convert(k, args[0], where, depth): self._convert(v, args[1], where, depth)
                    for k, v in value.items()
                }
            return value
        if origin is typing.Literal:
            if value in typing.get_args(hint):
                return value
            raise RemoteProtocolError(f"{where}: {value!r} is not one of {typing.get_args(hint)}")
        if isinstance(hint, type):
            if hint in self._by_type:
                if not isinstance(value, dict):
                    raise _wrong(where, "a message map", value)
                return self._build(value, depth + 1)
            if hint is bool:
                if isinstance(value, bool):
                    return value
                raise _wrong(where, "bool", value)
            if hint is int:
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
                raise _wrong(where, "int", value)
            if hint is float:
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return float(value)
                raise _wrong(where, "float", value)
            if hint is bytes:
                if isinstance(value, bytes):
                    return value
                raise _wrong(where, "bytes", value)
            if hint is str:
                if isinstance(value, str):
                    return value
                raise _wrong(where, "str", value)
            # NewType / enum / int subclasses: accept the base value and construct.
            try:
                return hint(value)
            except (TypeError, ValueError) as exc:
                raise RemoteProtocolError(f"{where}: {value!r} is not a valid {hint}") from exc
        supertype = getattr(hint, "__supertype__", None)
        if supertype is not None:  # typing.NewType
            return self._convert(value, supertype, where, depth)
        return value


def _wrong(where: str, want: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(f"{where}: expected {want}, got {type(value).__name__}")


__all__ = ["DEFAULT_MAX_FRAME", "MessageCodec", "decode", "encode"]
