"""providers.http.parse_head against http.client.parse_headers: the same HTTPMessage for every head."""
from __future__ import annotations

import http.client
import io

import pytest
from urllib3.exceptions import HeaderParsingError
from urllib3.util.response import assert_header_parsing

from providers.http import parse_head

PLAIN = [
    b"Content-Type: application/json\r\nContent-Length: 12\r\n\r\n",
    b"Content-Type: application/json\nContent-Length: 12\n\n",  # LF only
    b"\r\n",  # no fields
    b"",  # EOF at once
    b"X-A: 1\r\nX-A: 2\r\nx-a:3\r\n\r\n",  # repeated, no blank after the colon
    b"X-Trail: a b  \r\nX-Lead:\t  \tv\r\nX-Empty:\r\nX-Blank:   \r\n\r\n",  # blanks kept at the end, not the start
    b"X-Bytes: caf\xe9 \x00\x7f\xff\r\nX-Colon: a:b::c\r\n\r\n",  # latin-1, NUL, colons in the value
    b"Set-Cookie: a=1\r\nRetry-After: 5\r\n",  # EOF instead of the blank line
    b"X-Odd!#$%&'*+-.^_`|~: 1\r\n\r\n",  # every name character the email package allows
    b"X-Vt: a\x0bb\x0cc\x1cd\x85e\r\n\r\n",  # characters str.splitlines breaks at, but the email package not
]

HOSTILE = [
    b"X-Folded: a\r\n  b\r\nNext: 1\r\n\r\n",  # a continuation line
    b" X-Lead: 1\r\n\r\n",  # the first line a continuation
    b"No colon here\r\nX-After: 1\r\n\r\n",  # the rest becomes the body: urllib3 warns
    b": no name\r\nX: 1\r\n\r\n",
    b"X-CR: a\rb\r\nX: 1\r\n\r\n",  # a bare CR is a line break to the email package
    b"From nobody\r\nX: 1\r\n\r\n",  # a unix-from line
    b"X-Space Name: 1\r\n\r\n",
    b"X-Unended: 1",  # EOF inside a line
]


def _both(head: bytes) -> tuple[http.client.HTTPMessage, http.client.HTTPMessage]:
    return (parse_head(io.BufferedReader(io.BytesIO(head + b"BODY"))),
            http.client.parse_headers(io.BufferedReader(io.BytesIO(head + b"BODY"))))


def _verdict(msg: http.client.HTTPMessage) -> str | None:
    try:
        assert_header_parsing(msg)
    except HeaderParsingError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("head", PLAIN + HOSTILE)
def test_same_message_as_http_client(head: bytes) -> None:
    fast, slow = _both(head)
    assert fast.items() == slow.items()
    assert [type(d) for d in fast.defects] == [type(d) for d in slow.defects]
    assert fast.get_unixfrom() == slow.get_unixfrom()
    assert (fast.get_payload() or "") == (slow.get_payload() or "")
    assert _verdict(fast) == _verdict(slow)
    for name in ("content-length", "x-a", "x-trail", "x-lead", "x-bytes", "retry-after", "x-cr"):
        assert fast.get(name) == slow.get(name)
        assert fast.get_all(name) == slow.get_all(name)


@pytest.mark.parametrize("head", [h for h in PLAIN if h.endswith(b"\n\n") or h == b"\r\n"])
def test_plain_heads_skip_the_email_parser(head: bytes) -> None:
    # After a head's blank line the email parser leaves a str payload (''); the direct build leaves none.
    fast, slow = _both(head)
    assert fast.get_payload() is None
    assert slow.get_payload() == ""


@pytest.mark.parametrize("head", HOSTILE)
def test_other_heads_go_to_the_email_parser(head: bytes) -> None:
    fast, _ = _both(head)
    assert fast.get_payload() is not None


def test_the_body_is_left_unread() -> None:
    fp = io.BufferedReader(io.BytesIO(b"A: 1\r\n\r\nBODY"))
    parse_head(fp)
    assert fp.read() == b"BODY"


def test_limits_of_http_client_apply() -> None:
    with pytest.raises(http.client.LineTooLong):
        parse_head(io.BufferedReader(io.BytesIO(b"X: " + b"a" * 70000 + b"\r\n\r\n")))
    with pytest.raises(http.client.HTTPException):
        parse_head(io.BufferedReader(io.BytesIO(b"X: 1\r\n" * 101 + b"\r\n")))
