"""Images a client names by URL: data URLs decoded strictly, remote URLs fetched without becoming an SSRF hole.

A remote fetch is a request the gateway makes on a stranger's behalf, so it is fenced in: http(s) only, every
hop's host resolved once and refused if any address is special-purpose (data/special_purpose_ranges.txt, a
fixed table, plus Python's ipaddress flags), the connection made to that checked address (DNS rebinding cannot
swap it), a byte cap enforced while reading, one deadline across all hops, and an answer that must really be an
image. check_url() applies the same address rules without fetching, for URLs an upstream will fetch itself.
ByteBudget bounds the bytes a worker's fetches may hold at once.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, quote, urljoin, urlsplit

import certifi
import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from errors import BadRequestError, GatewayError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_DATA_URL = re.compile(r"data:image/(png|jpe?g|gif|webp);base64,(.*)", re.IGNORECASE | re.DOTALL)
# What may go into a Host header: letters, digits, dots, hyphens, underscores (after IDNA encoding).
_HOSTNAME = re.compile(r"[a-z0-9_.-]{1,253}")
RANGES_FILE = Path(__file__).with_name("data") / "special_purpose_ranges.txt"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class ImageRefusedError(BadRequestError):
    """An image_url the gateway will not use; the message says why, the caller sets param."""

    code = "invalid_image_url"


def sniff_image(data: bytes) -> str | None:
    """The image MIME type the magic bytes announce, or None if they announce none we accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def parse_data_url(url: str, *, max_bytes: int = 20_000_000) -> tuple[bytes, str]:
    """(bytes, MIME) from data:image/<png|jpeg|gif|webp>;base64,...; the MIME returned is the one the bytes carry."""
    match = _DATA_URL.fullmatch(url.strip())
    if not match:
        head = url[:40].split(",", 1)[0]
        raise ImageRefusedError(f"The data URL '{head}' is not supported: "
                                "send data:image/<png|jpeg|gif|webp>;base64,...")
    payload = re.sub(r"\s+", "", match.group(2))  # line-wrapped base64 is common and harmless
    if len(payload) // 4 * 3 > max_bytes:
        raise ImageRefusedError(f"The data URL image is larger than {max_bytes} bytes.")
    try:
        data = base64.b64decode(payload, validate=True)  # validate: stray characters are an error, not skipped
    except (binascii.Error, ValueError):
        raise ImageRefusedError("The data URL is not valid base64.") from None
    mime = sniff_image(data)
    if mime is None:
        raise ImageRefusedError("The data URL does not hold an image (PNG, JPEG, GIF or WebP bytes expected).")
    return data, mime


@dataclass(frozen=True)
class SpecialRange:
    """One row of data/special_purpose_ranges.txt."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    action: str  # "deny", or "embedded": judge the IPv4 address in the last 32 bits instead
    reason: str


def load_ranges(path: Path = RANGES_FILE) -> list[SpecialRange]:
    """The table's rows, most specific first (so a /32 cloud endpoint names itself, not its /16)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        cidr, action, reason = text.split(None, 2)
        if action not in ("deny", "embedded"):
            raise ValueError(f"{path.name}:{number}: unknown action {action!r}")
        rows.append(SpecialRange(ipaddress.ip_network(cidr), action, reason.strip()))
    return sorted(rows, key=lambda r: (r.network.version, -r.network.prefixlen))


SPECIAL_RANGES = load_ranges()


def special_purpose(ip: IPAddress) -> SpecialRange | None:
    """The most specific row of the table that holds ip, or None. Independent of Python's ipaddress flags."""
    return next((r for r in SPECIAL_RANGES if r.network.version == ip.version and ip in r.network), None)


def is_forbidden_ip(ip: IPAddress, allow_loopback: bool) -> str | None:
    """Why the gateway must not connect to ip, or None if it is a public address (or loopback when allowed).

    The fixed table decides first, so the answer does not move with Python's patch release (3.11.7 calls
    192.0.0.8 and 3fff::/20 global); the standard flags then catch anything the table lacks.
    """
    row = special_purpose(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded, how = _embedded_ipv4(ip)
        if embedded is not None:
            # The packet goes to the IPv4 address inside, so that address is judged; of these forms only
            # ::ffff:127.x.y.z is plain loopback, so only it may pass under allow_loopback.
            reason = is_forbidden_ip(embedded, allow_loopback and how == "IPv4-mapped")
            if reason:
                return f"{reason} {embedded} embedded in {how} form"
            if row is not None and row.action == "embedded":
                return None
            # 6to4 and IPv4-compatible forms carrying a public address fall through: the table refuses them.
    if ip.is_loopback or (row is not None and row.reason == "loopback address"):
        # allow_loopback lets tests reach 127.0.0.1; it must open nothing else, so it returns here.
        return None if allow_loopback else "loopback address"
    if row is not None:
        return row.reason
    checks = [
        (ip.is_unspecified, "unspecified address"),
        (ip.is_link_local, "link-local address"),
        (ip.is_multicast, "multicast address"),
        (ip.version == 6 and ip.is_site_local, "site-local address"),
        (ip.is_reserved, "reserved address"),
        (ip.is_private, "private address"),
        (not ip.is_global, "non-public address"),
    ]
    return next((reason for hit, reason in checks if hit), None)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, str]:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64), and how."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves, not IPv4-compatible
        return ipaddress.IPv4Address(int(ip)), "IPv4-compatible"
    return None, ""


def default_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (cooperative under gevent's monkey patching)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def fetch_image(url: str, *, allow_loopback: bool = False, max_bytes: int = 20_000_000, timeout: float = 15.0,
                max_redirects: int = 3, resolver: Resolver | None = None) -> tuple[bytes, str]:
    """(bytes, MIME) of the image at an http(s) URL, or ImageRefusedError saying why not."""
    deadline = time.monotonic() + timeout
    with _gevent_deadline(timeout):
        for _hop in range(max_redirects + 1):
            parts, host, port = _check_url(url)
            ip = _resolve_checked(parts, host, port, allow_loopback, resolver or default_resolver)
            location = _request(parts, host, port, ip, deadline, timeout, max_bytes)
            if isinstance(location, tuple):
                return location
            url = location
    raise ImageRefusedError(f"The image URL was refused: too many redirects (more than {max_redirects}).")


def check_url(url: str, *, allow_loopback: bool = False, timeout: float = 15.0,
              resolver: Resolver | None = None) -> None:
    """Refuse an http(s) URL whose host is, or resolves to, an address fetch_image would refuse; connect to nothing.

    For URLs an upstream will fetch itself: the same rules, though the upstream resolves the name again and
    follows redirects on its own, which no check made here can see.
    """
    with _gevent_deadline(timeout):
        parts, host, port = _check_url(url)
        _resolve_checked(parts, host, port, allow_loopback, resolver or default_resolver)


def _shown(parts: SplitResult) -> str:
    """scheme://host[:port] for messages: never userinfo, and no path or query (signed URLs carry tokens there)."""
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}"[:200]


def _check_url(url: str) -> tuple[SplitResult, str, int]:
    """The URL split, its host (IDNA, lower case, no brackets) and port, if the scheme and form are acceptable."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ImageRefusedError("The image URL is malformed (bad host or port).") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageRefusedError(f"The image URL was refused: scheme '{scheme[:20]}' is not allowed "
                                "(only http and https).")
    if "@" in parts.netloc:
        raise ImageRefusedError("The image URL was refused: URLs with credentials (user@host) are not allowed.")
    host = parts.hostname or ""
    if not host:
        raise ImageRefusedError("The image URL was refused: it names no host.")
    if not _is_ip_literal(host):
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            host = ""
        if not _HOSTNAME.fullmatch(host):
            raise ImageRefusedError("The image URL was refused: the host name is not valid.")
    return parts, host, port or (443 if scheme == "https" else 80)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve_checked(parts: SplitResult, host: str, port: int, allow_loopback: bool, resolver: Resolver) -> str:
    """The one address this hop connects to, after refusing the host if ANY of its addresses is forbidden.

    Refusing on any bad address (rather than picking a good one) is simpler and safer: a name that mixes
    public and private answers is suspect, and no fallback logic can then wander onto the private one.
    """
    verb = "its host is"
    try:
        candidates = [ipaddress.ip_address(host)]  # a literal IP: no DNS at all
    except ValueError:
        verb = "it resolves to"
        try:
            candidates = [ipaddress.ip_address(a) for a in resolver(host, port)]
        except (OSError, UnicodeError, ValueError):
            candidates = []
        if not candidates:
            raise ImageRefusedError(f"The image URL {_shown(parts)} was refused: its host does not resolve.") from None
    for ip in candidates:
        reason = is_forbidden_ip(ip, allow_loopback)
        if reason:
            article = "an" if reason[0] in "aeiouAEIOU" and not reason.startswith("uni") else "a"
            raise ImageRefusedError(f"The image URL {_shown(parts)} was refused: {verb} {article} {reason} ({ip}).")
    ip = candidates[0]
    # Connect to the v4 address itself for mapped addresses, so it works where IPv6 sockets are v6-only.
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _request(parts: SplitResult, host: str, port: int, ip: str, deadline: float, timeout: float,
             max_bytes: int) -> tuple[bytes, str] | str:
    """One GET to the checked ip: the image, or the absolute URL a redirect points to."""
    scheme = parts.scheme.lower()
    shown = _shown(parts)
    default_port = 443 if scheme == "https" else 80
    host_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_header += f":{port}"
    # Percent-encode what cannot go on a request line (spaces, non-ASCII, control bytes); the rest is kept as sent.
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe="/?&=%:@!$'()*+,;~[]")
    headers = {"Host": host_header, "User-Agent": "ai-gateway-image-fetch", "Accept": "image/*",
               # identity: a compressed body could inflate far past the cap from a few bytes read.
               "Accept-Encoding": "identity"}
    # urllib3 pools, not requests: no proxy env vars, no cookies, no automatic redirects or retries.
    if scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            ip, port, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(), retries=False, maxsize=1)
    else:
        pool = urllib3.HTTPConnectionPool(ip, port, retries=False, maxsize=1)
    try:
        remaining = _remaining(deadline, timeout, shown)
        resp = pool.urlopen("GET", target, headers=headers, retries=False, redirect=False, preload_content=False,
                            decode_content=False, timeout=urllib3.Timeout(connect=remaining, read=remaining))
        try:
            if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                return urljoin(parts.geturl(), resp.headers["Location"])
            return _read_image(resp, shown, deadline, timeout, max_bytes)
        finally:
            resp.close()  # never reuse: the next hop gets its own checked connection
    except NewConnectionError as exc:  # listed first: urllib3 makes it a subclass of ConnectTimeoutError
        why = exc.__cause__ or "connection failed"
        raise ImageRefusedError(f"The image URL {shown} could not be fetched ({why}).") from None
    except (TimeoutError, Urllib3Timeout):
        raise ImageRefusedError(f"The image URL {shown} did not answer within {timeout:g} s.") from None
    except (HTTPError, OSError) as exc:
        raise ImageRefusedError(f"The image URL {shown} could not be fetched ({type(exc).__name__}).") from None
    finally:
        pool.close()


def _read_image(resp: urllib3.BaseHTTPResponse, shown: str, deadline: float, timeout: float,
                max_bytes: int) -> tuple[bytes, str]:
    """The body, read in chunks and abandoned as soon as it passes max_bytes or the deadline, if it is an image."""
    if not 200 <= resp.status < 300:
        raise ImageRefusedError(f"The image URL {shown} was refused: it answered HTTP {resp.status}.")
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith("image/"):
        raise ImageRefusedError(f"The image URL {shown} was refused: not an image (Content-Type {ctype[:60]}).")
    if resp.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise ImageRefusedError(f"The image URL {shown} was refused: compressed bodies (Content-Encoding) "
                                "are not accepted.")
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise ImageRefusedError(f"The image URL {shown} was refused: larger than {max_bytes} bytes ({length}).")
    chunks: list[bytes] = []
    total = 0
    while True:
        _set_socket_timeout(resp, _remaining(deadline, timeout, shown))
        chunk = resp.read1(_CHUNK)  # read1: whatever has arrived, so a slow trickle still meets the deadline check
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise ImageRefusedError(f"The image URL {shown} was refused: larger than {max_bytes} bytes.")
        chunks.append(chunk)
    data = b"".join(chunks)
    mime = sniff_image(data)
    if mime is None:
        raise ImageRefusedError(f"The image URL {shown} was refused: not an image "
                                "(PNG, JPEG, GIF or WebP bytes expected).")
    return data, mime


def _remaining(deadline: float, timeout: float, shown: str) -> float:
    """Seconds left before the deadline shared by every hop; refuses once none are left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageRefusedError(f"The image URL {shown} did not answer within {timeout:g} s.")
    return left


def _set_socket_timeout(resp: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """Shrink the socket's timeout to what is left, so a body trickled byte by byte still stops at the deadline."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


@contextlib.contextmanager
def _gevent_deadline(seconds: float) -> Iterator[None]:
    """Under gevent, also bound what socket timeouts cannot (DNS lookups); without gevent, nothing."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        yield
        return
    import gevent

    timer = gevent.Timeout(seconds + 0.5)  # a margin, so the per-socket timeouts normally fire first
    timer.start()
    try:
        yield
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise ImageRefusedError(f"The image URL did not answer within {seconds:g} s.") from None
    finally:
        timer.close()


class FetchBusyError(GatewayError):
    """The worker's image-fetch byte budget stayed full for the whole wait: try again shortly."""

    status, type, code = 503, "api_error", "image_fetch_busy"


class Lease:
    """One request's share of a ByteBudget: bytes reserved for fetches under way, and bytes of finished ones."""

    def __init__(self) -> None:
        self.reserved = 0  # everything this request holds of the budget
        self.kept = 0  # of which: bytes of images already fetched, held until the request lets go


class ByteBudget:
    """Bytes the image fetches of one worker may hold at once (gevent-cooperative, one per process).

    A fetch reserves its cap (max_image_bytes) before connecting, keeps only the bytes it read once done, and the
    request returns what it kept when it no longer needs the images. So memory stays flat whatever keys send:
    past the budget, fetches wait instead of downloading.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = _new_event()

    def reserve(self, lease: Lease, amount: int, wait: float) -> None:
        """Take amount bytes for lease, waiting at most wait seconds for other requests to free some."""
        deadline = time.monotonic() + wait
        while self.used + amount > self.limit:
            if lease.kept + amount > self.limit:
                # What this request already holds is not coming back while it waits for itself.
                raise BadRequestError(
                    f"The images of this request need more than the {self.limit} bytes this server fetches at "
                    "once; send fewer or smaller images, or data URLs.", param="messages", code="images_too_large")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._freed.wait(remaining):
                raise FetchBusyError(f"The server is fetching too many images right now (over {self.limit} bytes in "
                                "flight); retry in a moment.", headers={"Retry-After": "1"})
        self.used += amount
        lease.reserved += amount

    def keep(self, lease: Lease, reserved: int, kept: int) -> None:
        """A fetch that reserved `reserved` bytes finished holding `kept` (0 if it failed): return the rest."""
        lease.kept += kept
        self._give_back(lease, reserved - kept)

    def release(self, lease: Lease) -> None:
        """Everything the lease holds goes back (the request is done with its images)."""
        lease.kept = 0
        self._give_back(lease, lease.reserved)

    def _give_back(self, lease: Lease, amount: int) -> None:
        if amount <= 0:
            return
        lease.reserved -= amount
        self.used -= amount
        freed, self._freed = self._freed, _new_event()
        freed.set()  # every waiter wakes and checks again


def _new_event():  # noqa: ANN202 - gevent.event.Event, imported late like gevent elsewhere in this module
    from gevent.event import Event

    return Event()
