"""Test harness: a fence at the socket layer so no test can open a connection off this machine.

guard_sockets() wraps connect/connect_ex of the stdlib socket class and gevent's, in this process: a connection
to anything but a loopback address (or a Unix socket) raises OffBoxConnect before any packet goes out, and is
recorded so the test can assert none was tried. tests/netguard_site/sitecustomize.py installs the same fence in
a gateway subprocess when NETGUARD_LOG names a file (the attempts are appended there). This is test code only:
the gateway itself never imports it.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterator


class OffBoxConnect(OSError):
    """A connection to an address off this machine, refused by the test fence."""


def is_loopback_address(address: object) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX path: stays on the machine
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except ValueError:
        return False  # a name: the socket layer would resolve it behind the fence's back
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _classes() -> list[type]:
    classes: list[type] = [socket.socket]
    try:
        import gevent._socket3 as gsock
        classes.append(gsock.socket)
    except ImportError:
        pass
    return classes


def install(record: Callable[[str], None]) -> Callable[[], None]:
    """Fence every socket class; record(address) is called for each refused attempt. Returns the undo."""
    saved = []
    for cls in _classes():
        for name in ("connect", "connect_ex"):
            original = cls.__dict__.get(name) or getattr(cls, name)
            saved.append((cls, name, cls.__dict__.get(name)))

            def fenced(self, address, _original=original):  # noqa: ANN001, ANN202
                if getattr(self, "family", None) in (socket.AF_INET, socket.AF_INET6) \
                        and not is_loopback_address(address):
                    record(repr(address))
                    raise OffBoxConnect(errno.ENETUNREACH, f"test fence: no connection off this machine ({address})")
                return _original(self, address)
            setattr(cls, name, fenced)

    def undo() -> None:
        for cls, name, original in saved:
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
    return undo


@contextlib.contextmanager
def guard_sockets() -> Iterator[list[str]]:
    """In this process, for the block: off-box connects raise; the list yielded collects the attempts."""
    attempts: list[str] = []
    undo = install(attempts.append)
    try:
        yield attempts
    finally:
        undo()
