"""The proxy's ``Forwarded`` / ``X-Forwarded-*`` values, built from validated pieces only.

A backend trusts the element the proxy appends (RFC 7239): whatever the client sent
must not be able to forge its ``for=`` or split it. So:

* the peer address comes from the socket and is checked with :mod:`ipaddress`
  (anything else becomes ``unknown``); IPv6 is quoted, ``"[2001:db8::1]"``;
* ``host=`` is the ``Host`` value only if it is a syntactically valid ``uri-host
  [":" port]``, and always as a quoted-string with ``\\`` and ``"`` escaped; an
  invalid ``Host`` is left out;
* a ``Forwarded`` value from the client (earlier proxies) is kept only if it parses as
  RFC 7239 elements, and an ``X-Forwarded-For`` only if it is a plain list of
  address-like items; otherwise it is dropped rather than left to swallow ours
  (``for=x;host="`` would otherwise open a quoted string that eats our element).

Pure: bytes and strings in, bytes out.
"""

from __future__ import annotations

import ipaddress
import re

from dsys.http11 import valid_host

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_PAIR = rb"%s=(?:%s|%s)" % (_TOKEN, _TOKEN, _QUOTED)
_ELEMENT = rb"%s(?:;%s)*" % (_PAIR, _PAIR)
# RFC 7239 section 4: Forwarded = 1#forwarded-element (a list: OWS around commas).
# Stricter than the grammar: no empty elements or pairs, so every element is plain.
_FORWARDED = re.compile(rb"%s(?:[ \t]*,[ \t]*%s)*\Z" % (_ELEMENT, _ELEMENT))
# X-Forwarded-For: a comma list of addresses (v4, v6, with or without port/brackets).
_XFF = re.compile(rb"[0-9A-Za-z.:\[\]_\-]+(?:[ \t]*,[ \t]*[0-9A-Za-z.:\[\]_\-]+)*\Z")


def quote(value: bytes) -> bytes:
    """``value`` as an RFC 9110 quoted-string (``\\`` and ``"`` escaped)."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def node(peer: str) -> bytes:
    """The ``for=`` node of a peer address: ``192.0.2.1``, ``"[2001:db8::1]"``, ``unknown``."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return b"unknown"
    if ip.version == 6:
        return b'"[' + str(ip).encode() + b']"'
    return str(ip).encode()


def element(peer: str, proto: str, host: bytes | None) -> bytes:
    """This proxy's ``Forwarded`` element: ``for=...;proto=...[;host="..."]``."""
    return element_of(b"for=" + node(peer) + b";proto=" + _proto(proto), host)


def element_of(prefix: bytes, host: bytes | None) -> bytes:
    """:func:`element` from its ``for=...;proto=...`` part, already built from :func:`node`.

    For a connection that sends many requests: the peer address is checked once.
    """
    if host and valid_host(host):
        return prefix + b';host="' + host + b'"'  # a valid host has no '"' or '\\'
    return prefix


def prefix(peer: str, proto: str) -> bytes:
    """The ``for=...;proto=...`` part of :func:`element` (see :func:`element_of`)."""
    return b"for=" + node(peer) + b";proto=" + _proto(proto)


def _proto(proto: str) -> bytes:
    return b"https" if proto == "https" else b"http"


def forwarded(prior: bytes | None, mine: bytes) -> bytes:
    """The ``Forwarded`` value to send: a valid ``prior`` list, then ``mine``."""
    if prior and _FORWARDED.match(prior) is not None:
        return prior + b", " + mine
    return mine


def x_forwarded_for(prior: bytes | None, peer: str) -> bytes:
    """The ``X-Forwarded-For`` value to send: a valid ``prior`` list, then the peer."""
    addr = node(peer).strip(b'"[]')
    if prior and _XFF.match(prior) is not None:
        return prior + b", " + addr
    return addr


__all__ = ["element", "element_of", "forwarded", "node", "prefix", "quote", "x_forwarded_for"]
