"""safefetch: data URLs, the address rules, and remote fetches against a real server on 127.0.0.1."""
from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest

import safefetch
from errors import BadRequestError
from safefetch import (
    ByteBudget,
    FetchBusyError,
    ImageRefusedError,
    Lease,
    check_url,
    fetch_image,
    is_forbidden_ip,
    parse_data_url,
    sniff_image,
    special_purpose,
)
from tests.image_server import BIG_BYTES, CAT_JPG, CAT_PNG, ImageServer
from tests.netguard import OffBoxConnect, guard_sockets

GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00" \
      b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00/\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00"


@pytest.fixture(autouse=True)
def no_off_box_connections() -> Iterator[list[str]]:
    """Test harness: any connect to an address off this machine raises, and the test fails if one was tried."""
    with guard_sockets() as attempts:
        yield attempts
    assert attempts == [], f"connections off this machine were attempted: {attempts}"


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


def refused(reason: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ImageRefusedError:
    """Call fn, expect an ImageRefusedError that is a 400 invalid_image_url whose message contains reason."""
    with pytest.raises(ImageRefusedError) as info:
        fn(*args, **kwargs)
    exc = info.value
    assert exc.status == 400 and exc.code == "invalid_image_url" and exc.type == "invalid_request_error"
    assert reason in exc.message, exc.message
    return exc


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"literal IPs must not be resolved, got {host}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- magic bytes and data URLs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, mime", [
    (CAT_PNG, "image/png"), (CAT_JPG, "image/jpeg"), (GIF, "image/gif"), (b"GIF87a" + GIF[6:], "image/gif"),
    (WEBP, "image/webp"), (b"RIFF\x00\x00\x00\x00WAVEfmt ", None), (b"<html>", None), (b"", None), (b"\x89PN", None),
])
def test_sniff_image(data: bytes, mime: str | None) -> None:
    assert sniff_image(data) == mime


def test_data_url_good() -> None:
    assert parse_data_url(f"data:image/png;base64,{b64(CAT_PNG)}") == (CAT_PNG, "image/png")
    assert parse_data_url(f"data:image/webp;base64,{b64(WEBP)}") == (WEBP, "image/webp")
    wrapped = b64(CAT_JPG)
    wrapped = "\n".join(wrapped[i:i + 40] for i in range(0, len(wrapped), 40))
    assert parse_data_url(f"DATA:image/JPEG;base64,{wrapped}") == (CAT_JPG, "image/jpeg")
    # The MIME returned is what the bytes are, not what the label claims.
    assert parse_data_url(f"data:image/png;base64,{b64(GIF)}") == (GIF, "image/gif")


@pytest.mark.parametrize("url, reason", [
    ("data:image/png;base64,iVBORw0KGgo@@@", "not valid base64"),
    (f"data:image/png;base64,{b64(CAT_PNG)[:-1]}", "not valid base64"),  # broken padding
    (f"data:image/png;base64,{b64(b'just some text, no pixels')}", "does not hold an image"),
    ("data:image/png;base64,", "does not hold an image"),
    (f"data:text/plain;base64,{b64(b'hello')}", "is not supported"),
    (f"data:image/svg+xml;base64,{b64(b'<svg/>')}", "is not supported"),
    ("data:image/png,rawbytes", "is not supported"),
    ("http://example.com/x.png", "is not supported"),
])
def test_data_url_bad(url: str, reason: str) -> None:
    refused(reason, parse_data_url, url)


def test_data_url_size_cap() -> None:
    refused("larger than 10 bytes", parse_data_url, f"data:image/png;base64,{b64(CAT_PNG)}", max_bytes=10)


# --- the address rules ----------------------------------------------------------------------------------------

FORBIDDEN = [
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("100.64.0.1", "carrier-grade NAT"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("169.254.169.254", "cloud metadata endpoint"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("0.1.2.3", "this network"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"), ("fec0::1", "site-local"), ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    # What Python 3.11.7's ipaddress calls global, and the issue saw fetched or passed:
    ("192.0.0.8", "IETF protocol assignment"), ("192.0.0.192", "IETF protocol assignment"),
    ("3fff::1", "documentation"), ("168.63.129.16", "cloud host endpoint"),
    ("100.100.100.200", "cloud metadata endpoint"), ("fd00:ec2::254", "cloud metadata endpoint"),
    ("::ffff:10.0.0.1", "private address 10.0.0.1 embedded in IPv4-mapped"),
    ("::ffff:169.254.169.254", "cloud metadata endpoint 169.254.169.254 embedded"),
    ("::ffff:192.0.0.8", "IETF protocol assignment address 192.0.0.8 embedded in IPv4-mapped"),
    ("::10.0.0.1", "embedded in IPv4-compatible"), ("2002:a00:1::", "embedded in 6to4"),
    ("::8.8.8.8", "deprecated IPv4-compatible"), ("2002:808:808::1", "6to4 address"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata endpoint 169.254.169.254 embedded in NAT64"),
    ("64:ff9b:1::808:808", "local-use NAT64"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
]


@pytest.mark.parametrize("allow_loopback", [False, True])
@pytest.mark.parametrize("address, reason", FORBIDDEN)
def test_forbidden_addresses(address: str, reason: str, allow_loopback: bool) -> None:
    found = is_forbidden_ip(ipaddress.ip_address(address), allow_loopback)
    assert found is not None and reason in found


@pytest.mark.parametrize("address", ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"])
def test_loopback_only_when_allowed(address: str) -> None:
    assert "loopback" in is_forbidden_ip(ipaddress.ip_address(address), False)
    assert is_forbidden_ip(ipaddress.ip_address(address), True) is None


@pytest.mark.parametrize("address", ["64:ff9b::7f00:1", "::127.0.0.1", "2002:7f00:1::"])
def test_tunnelled_loopback_never_allowed(address: str) -> None:
    assert "loopback address 127.0.0.1 embedded" in is_forbidden_ip(ipaddress.ip_address(address), True)


PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "151.101.1.69", "192.0.1.255", "192.0.3.0", "198.17.255.255",
          "198.20.0.0", "223.255.255.255", "100.63.255.255", "100.128.0.0", "172.15.255.255", "172.32.0.0",
          "168.63.129.15", "168.63.129.17", "2606:4700::1111", "2a00:1450:4001:80b::200e", "2001:4860:4860::8888",
          "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert is_forbidden_ip(ip, False) is None and is_forbidden_ip(ip, True) is None


# --- the fixed table: what the answer rests on, whatever this Python's ipaddress flags say -------------------------

REQUIRED = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
            "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24",
            "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
            "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32", "::/128", "::1/128", "::ffff:0:0/96",
            "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "100:0:0:1::/64", "2001::/23", "2001:db8::/32",
            "2002::/16", "2620:4f:8000::/48", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10",
            "ff00::/8", "168.63.129.16/32", "169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32"]


def test_table_has_every_required_range_and_names_its_source() -> None:
    networks = {str(r.network) for r in safefetch.SPECIAL_RANGES}
    assert [n for n in REQUIRED if str(ipaddress.ip_network(n)) not in networks] == []
    text = safefetch.RANGES_FILE.read_text()
    assert "iana-ipv4-special-registry" in text and "iana-ipv6-special-registry" in text and "retrieved" in text


def test_table_rejects_a_bad_row(tmp_path: Path) -> None:
    bad = tmp_path / "ranges.txt"
    bad.write_text("10.0.0.0/8  allow  private address\n")
    with pytest.raises(ValueError, match="unknown action"):
        safefetch.load_ranges(bad)
    bad.write_text("10.0.0.0/33  deny  private address\n")
    with pytest.raises(ValueError):
        safefetch.load_ranges(bad)


def _edges(row: safefetch.SpecialRange) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [row.network.network_address, row.network.broadcast_address]


@pytest.mark.parametrize("row", safefetch.SPECIAL_RANGES, ids=lambda r: str(r.network))
def test_every_range_refused_at_both_ends(row: safefetch.SpecialRange) -> None:
    """The table alone catches each range's first and last address (so a flag's change cannot open it), and the
    full rule refuses them; 'embedded' ranges are judged by the IPv4 address they carry."""
    for ip in _edges(row):
        assert special_purpose(ip) is not None, ip
        if row.action == "embedded":
            # ::ffff:0.0.0.0 carries 0.0.0.0, ::ffff:255.255.255.255 the broadcast address: both refused.
            assert "embedded in" in is_forbidden_ip(ip, False), ip
        elif row.reason == "loopback address":
            assert is_forbidden_ip(ip, False) == "loopback address" and is_forbidden_ip(ip, True) is None
        else:
            assert is_forbidden_ip(ip, False) is not None and is_forbidden_ip(ip, True) is not None, ip



# --- URLs refused before any connection -------------------------------------------------------------------------

@pytest.mark.parametrize("allow_loopback", [False, True])
@pytest.mark.parametrize("url, reason", [
    ("http://10.0.0.1/x.png", "private address (10.0.0.1)"),
    ("http://172.16.0.1/x.png", "private address"),
    ("http://192.168.1.1/x.png", "private address"),
    ("http://100.64.0.1/x.png", "carrier-grade NAT address"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata endpoint"),
    ("http://169.254.1.1/x.png", "link-local address"),
    ("http://0.0.0.0:8080/x.png", "unspecified address"),
    ("http://[::]/x.png", "unspecified address"),
    ("http://[fe80::1]/x.png", "link-local address"),
    ("http://[fc00::1]/x.png", "unique-local private address"),
    ("https://[::ffff:10.0.0.1]/x.png", "private address 10.0.0.1 embedded in IPv4-mapped form"),
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("ftp://x/y.png", "scheme 'ftp' is not allowed"),
    ("gopher://x:70/_GET", "scheme 'gopher' is not allowed"),
    ("//example.com/x.png", "scheme '' is not allowed"),
    ("http:///x.png", "names no host"),
    ("http://example.com:99999/x.png", "malformed"),
    ("http://exa mple.com/x.png", "host name is not valid"),
])
def test_refused_urls(url: str, reason: str, allow_loopback: bool) -> None:
    refused(reason, fetch_image, url, allow_loopback=allow_loopback, resolver=no_dns)


def test_fence_refuses_off_box_connects(no_off_box_connections: list[str]) -> None:
    """The harness works: a connect to a documentation address never leaves, and is recorded."""
    with pytest.raises(OffBoxConnect), socket.socket() as sock:
        sock.connect(("192.0.2.1", 80))
    assert no_off_box_connections == ["('192.0.2.1', 80)"]
    no_off_box_connections.clear()


@pytest.mark.parametrize("url, reason", [
    ("http://192.0.0.8/x.png", "IETF protocol assignment address (192.0.0.8)"),
    ("http://168.63.129.16/machine?comp=goalstate", "cloud host endpoint (168.63.129.16)"),
    ("http://[3fff::1]/x.png", "documentation address (3fff::1)"),
    ("http://100.100.100.200/latest/meta-data/", "cloud metadata endpoint"),
    ("http://169.254.169.254/latest/meta-data/iam/", "cloud metadata endpoint (169.254.169.254)"),
    ("http://[fd00:ec2::254]/latest/", "cloud metadata endpoint"),
    ("ftp://example.com/x.png", "scheme 'ftp'"),
    ("http://user@example.com/x.png", "credentials"),
])
def test_check_url_refuses_without_connecting(url: str, reason: str) -> None:
    refused(reason, check_url, url, allow_loopback=True, resolver=no_dns)
    refused(reason, fetch_image, url, allow_loopback=True, resolver=no_dns)


def test_check_url_resolves_names_and_connects_to_nothing(server: ImageServer) -> None:
    before = sum(server.counts.values())
    refused("resolves to a private address (10.0.0.1)", check_url, "https://images.example.com/x.png",
            resolver=lambda host, port: ["93.184.215.14", "10.0.0.1"])
    check_url("https://images.example.com/x.png", resolver=lambda host, port: ["93.184.215.14"])
    check_url(server.url("/cat.png"), allow_loopback=True)
    refused("loopback address", check_url, server.url("/cat.png"))
    assert sum(server.counts.values()) == before


def test_credentials_refused_and_never_echoed() -> None:
    exc = refused("credentials", fetch_image, "http://admin:hunter2@127.0.0.1/x.png", allow_loopback=True)
    assert "hunter2" not in exc.message and "admin" not in exc.message


# --- against the local server -------------------------------------------------------------------------------------

def test_loopback_refused_by_default(server: ImageServer) -> None:
    before = server.counts["/cat.png"]
    for url in (server.url("/cat.png"), server.url("/cat.png", "localhost"), server.url("/cat.png", "[::1]"),
                server.url("/cat.png", "[::ffff:127.0.0.1]")):
        refused("loopback address", fetch_image, url)
    exc = refused("loopback address", fetch_image, server.url("/cat.png", "images.example.com"),
                  resolver=lambda host, port: ["127.0.0.1"])
    assert "resolves to a loopback address (127.0.0.1)" in exc.message
    assert server.counts["/cat.png"] == before  # refused before connecting, not after


def test_fetch_png_and_jpeg(server: ImageServer) -> None:
    assert fetch_image(server.url("/cat.png"), allow_loopback=True) == (CAT_PNG, "image/png")
    assert fetch_image(server.url("/cat.jpg"), allow_loopback=True) == (CAT_JPG, "image/jpeg")
    assert fetch_image(server.url("/cat.png", "[::ffff:127.0.0.1]"), allow_loopback=True) == (CAT_PNG, "image/png")


def test_odd_paths_are_encoded(server: ImageServer) -> None:
    assert fetch_image(server.url("/cat.png?q=a b&k=ü"), allow_loopback=True)[1] == "image/png"
    refused("answered HTTP 404", fetch_image, server.url("/cät png"), allow_loopback=True)


def test_redirect_followed(server: ImageServer) -> None:
    assert fetch_image(server.url("/redirect-ok"), allow_loopback=True) == (CAT_PNG, "image/png")
    refused("too many redirects", fetch_image, server.url("/redirect-ok"), allow_loopback=True, max_redirects=0)


def test_redirect_to_private_refused(server: ImageServer) -> None:
    refused("private address (10.0.0.1)", fetch_image, server.url("/redirect-private"), allow_loopback=True)


def test_redirect_loop_refused(server: ImageServer) -> None:
    before = server.counts["/redirect-loop"]
    refused("too many redirects", fetch_image, server.url("/redirect-loop"), allow_loopback=True, max_redirects=3)
    assert server.counts["/redirect-loop"] - before == 4  # the first request and three hops, then stop


def test_body_over_cap_stops_reading(server: ImageServer) -> None:
    started = time.monotonic()
    refused("larger than 1000000 bytes", fetch_image, server.url("/big.png"), allow_loopback=True,
            max_bytes=1_000_000)
    assert time.monotonic() - started < 3
    assert server.finished["/big.png"].wait(10)
    assert server.sent["/big.png"] < BIG_BYTES // 5  # stopped early: kernel buffers aside, about 1 MB went out


def test_declared_length_over_cap_refused_before_reading(server: ImageServer) -> None:
    refused("larger than 1000000 bytes (52428800)", fetch_image, server.url("/big-declared.png"),
            allow_loopback=True, max_bytes=1_000_000)
    assert server.finished["/big-declared.png"].wait(10)
    assert server.sent["/big-declared.png"] < BIG_BYTES // 5


@pytest.mark.parametrize("path, reason", [
    ("/text", "not an image (Content-Type text/html)"),
    ("/fake-png", "not an image (PNG, JPEG, GIF or WebP bytes expected)"),
    ("/404", "answered HTTP 404"),
])
def test_bad_answers_refused(server: ImageServer, path: str, reason: str) -> None:
    refused(reason, fetch_image, server.url(path), allow_loopback=True)


@pytest.mark.parametrize("path", ["/hang", "/trickle.png"])
def test_deadline(server: ImageServer, path: str) -> None:
    # Neither path ever completes, so only the deadline ends the fetch: a short one does not depend on load.
    started = time.monotonic()
    refused("did not answer within 0.5 s", fetch_image, server.url(path), allow_loopback=True, timeout=0.5)
    assert time.monotonic() - started < 2


def test_connection_refused() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused("could not be fetched", fetch_image, f"http://127.0.0.1:{port}/x.png", allow_loopback=True)


# --- resolution: once per hop, and the connection goes to the address that was checked ------------------------------

class RebindingResolver:
    """Answers 127.0.0.1 first and 10.0.0.1 afterwards, as a DNS-rebinding attacker's name server would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return ["127.0.0.1"] if len(self.calls) == 1 else ["10.0.0.1"]


def test_connects_to_checked_address(server: ImageServer) -> None:
    resolver = RebindingResolver()
    url = server.url("/cat.png", "images.example.com")
    assert fetch_image(url, allow_loopback=True, resolver=resolver) == (CAT_PNG, "image/png")
    assert resolver.calls == [("images.example.com", server.port)]  # resolved once; urllib3 never re-resolved
    assert server.hosts["/cat.png"] == f"images.example.com:{server.port}"


def test_every_hop_resolved_and_checked(server: ImageServer) -> None:
    resolver = RebindingResolver()
    before = server.counts["/cat.png"]
    refused("resolves to a private address (10.0.0.1)", fetch_image, server.url("/redirect-ok", "images.example.com"),
            allow_loopback=True, resolver=resolver)
    assert len(resolver.calls) == 2
    assert server.counts["/cat.png"] == before


def test_any_forbidden_answer_refuses() -> None:
    refused("private address (10.0.0.1)", fetch_image, "http://images.example.com/x.png", allow_loopback=True,
            resolver=lambda host, port: ["127.0.0.1", "10.0.0.1"])


def test_unresolvable_host() -> None:
    def fails(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    refused("does not resolve", fetch_image, "http://nowhere.invalid/x.png", resolver=fails)
    refused("does not resolve", fetch_image, "http://nowhere.invalid/x.png", resolver=lambda host, port: [])


# --- HTTPS: connect to the checked IP, yet verify the certificate against the name in the URL -----------------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageServer, str]]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=images.example.com", "-keyout", key, "-out", cert,
                    "-addext", "subjectAltName=DNS:images.example.com"], check=True, capture_output=True)
    with ImageServer(tls=(cert, key)) as srv:
        yield srv, cert


def test_https_verifies_the_original_name(tls_server: tuple[ImageServer, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    srv, cert = tls_server
    monkeypatch.setattr(certifi, "where", lambda: cert)  # trust the test certificate instead of the public CAs
    to_loopback = RebindingResolver()
    url = srv.url("/cat.png", "images.example.com")
    assert fetch_image(url, allow_loopback=True, resolver=to_loopback) == (CAT_PNG, "image/png")
    assert len(to_loopback.calls) == 1
    # Same server and address, but the certificate does not name this host: refused.
    refused("could not be fetched", fetch_image, srv.url("/cat.png", "other.example.com"), allow_loopback=True,
            resolver=lambda host, port: ["127.0.0.1"])


def test_https_rejects_untrusted_certificate(tls_server: tuple[ImageServer, str]) -> None:
    srv, _ = tls_server
    refused("could not be fetched", fetch_image, srv.url("/cat.png", "images.example.com"), allow_loopback=True,
            resolver=lambda host, port: ["127.0.0.1"])


# --- under gevent, as gunicorn's gevent worker runs it ----------------------------------------------------------------

GEVENT_SCRIPT = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, sys, time, gevent
    from tests.netguard import install
    off_box = []
    install(off_box.append)
    from safefetch import ImageRefusedError, fetch_image
    port = sys.argv[1]

    def outcome(host, path, timeout=0.5, **kw):  # 0.5 s for what never answers; the healthy /cat.png gets 5 s
        try:
            return fetch_image(f"http://{host}:{port}{path}", allow_loopback=True, timeout=timeout, **kw)[1]
        except ImageRefusedError as exc:
            return exc.message

    def slow_dns(host, port):
        gevent.sleep(10)
        return ["127.0.0.1"]

    started = time.monotonic()
    jobs = [gevent.spawn(outcome, "127.0.0.1", "/hang"), gevent.spawn(outcome, "127.0.0.1", "/cat.png", 5),
            gevent.spawn(outcome, "127.0.0.1", "/trickle.png")]
    gevent.joinall(jobs)
    middle = time.monotonic()
    dns = outcome("slow.example.com", "/cat.png", resolver=slow_dns)
    print(json.dumps({"results": [j.value for j in jobs], "concurrent": middle - started, "dns": dns,
                      "dns_seconds": time.monotonic() - middle, "off_box": off_box}))
""")


def test_under_gevent(server: ImageServer) -> None:
    """Greenlets fetch side by side, and the deadline also cuts off a DNS lookup, which socket timeouts cannot."""
    done = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, str(server.port)], check=False, capture_output=True,
                          text=True, timeout=20, cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    hang, cat, trickle = out["results"]
    assert cat == "image/png" and "did not answer within 0.5 s" in hang and "did not answer within 0.5 s" in trickle
    assert out["concurrent"] < 1  # one after the other, the two 0.5 s deadlines would take 1 s
    assert "did not answer within 0.5 s" in out["dns"] and out["dns_seconds"] < 3  # the lookup sleeps 10 s
    assert out["off_box"] == []


# --- the per-worker byte budget ---------------------------------------------------------------------------------

def test_budget_reserves_keeps_and_releases() -> None:
    budget = ByteBudget(100)
    a, b = Lease(), Lease()
    budget.reserve(a, 40, wait=0)
    budget.reserve(b, 40, wait=0)
    assert budget.used == 80
    budget.keep(a, 40, 10)  # a's fetch read 10 bytes: 30 come back at once
    assert (budget.used, a.reserved, a.kept) == (50, 10, 10)
    budget.reserve(a, 50, wait=0)
    with pytest.raises(FetchBusyError) as info:  # 100 in use: b must wait, and gives up at its deadline
        budget.reserve(b, 1, wait=0.2)
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
    budget.release(a)
    assert (budget.used, a.reserved, a.kept) == (40, 0, 0)
    budget.keep(b, 40, 0)  # a failed fetch keeps nothing
    assert budget.used == 0 and b.reserved == 0


def test_budget_waiter_wakes_when_bytes_come_back() -> None:
    import gevent

    budget = ByteBudget(100)
    holder, waiter = Lease(), Lease()
    budget.reserve(holder, 100, wait=0)
    gevent.spawn_later(0.1, budget.release, holder)
    started = time.monotonic()
    budget.reserve(waiter, 60, wait=5)  # would raise FetchBusyError if the release never woke it
    assert time.monotonic() - started < 4 and budget.used == 60


def test_budget_refuses_a_request_that_only_waits_for_itself() -> None:
    budget = ByteBudget(100)
    lease = Lease()
    budget.reserve(lease, 60, wait=0)
    budget.keep(lease, 60, 60)
    started = time.monotonic()
    with pytest.raises(BadRequestError) as info:  # BadRequestError: a 400, not a wait
        budget.reserve(lease, 50, wait=10)
    assert info.value.status == 400 and info.value.code == "images_too_large"
    assert time.monotonic() - started < 1
