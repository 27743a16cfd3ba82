"""gunicorn settings for the gateway: one gevent worker by default, sized for thousands of open streams."""
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import time

from gunicorn import util
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.workers.ggevent import GeventWorker

# OpenAI-style codes for the answers gunicorn gives itself, before the app sees a request.
_PARSER_CODES = {400: "invalid_request", 403: "forbidden", 414: "request_line_too_long",
                 417: "expectation_failed", 431: "request_headers_too_large", 500: "server_error",
                 501: "unsupported_transfer_coding"}


def write_json_error(sock, status_int, reason, mesg):
    """gunicorn's util.write_error, answering in OpenAI's JSON error shape instead of an HTML page."""
    client_error = 400 <= status_int < 500 or status_int == 501  # 501: a transfer coding the client chose
    body = json.dumps({"error": {
        "message": f"{reason}: {mesg}" if mesg else f"{reason}.",
        "type": "invalid_request_error" if client_error else "api_error",
        "param": None, "code": _PARSER_CODES.get(status_int, "invalid_request" if client_error else "server_error"),
    }}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    util.write_nonblock(sock, head + body)


def send_all(sock, data):
    """sock.sendall(data), without gevent's getsockopt(SO_SNDBUF) syscall and clock read before every write (a
    plain answer's one write, each streamed chunk). send() waits while the buffer is full and keeps the socket's
    timeout. A TLS socket keeps its own sendall."""
    if hasattr(sock, "_sslobj"):
        sock.sendall(data)
        return
    view = memoryview(data)
    while view:
        view = view[sock.send(view):]


class OneWriteResponse(wsgi.Response):
    """gunicorn's response, with its head sent in the same write as the first piece of the body.

    gunicorn writes the head and then each body piece with a syscall of its own: two sends, two TCP segments
    and two wake-ups of the client for every plain answer. Kept back until the first body piece (or close(),
    for an answer without one), the head costs no send of its own.
    """

    _head = b""
    _date = (0, "")  # (second, its Date header line): one per second for all responses, not one per response

    def default_headers(self):
        """gunicorn's status line and default headers, with the Date line made once a second: its
        email.utils.formatdate was 1% of a plain request's CPU (py-spy, c16)."""
        now = int(time.time())
        second, date = OneWriteResponse._date
        if second != now:
            date = f"Date: {util.http_date(now)}\r\n"
            OneWriteResponse._date = (now, date)
        connection = "upgrade" if self.upgrade else "close" if self.should_close() else "keep-alive"
        headers = [f"HTTP/{self.req.version[0]}.{self.req.version[1]} {self.status}\r\n",
                   f"Server: {self.version}\r\n", date, f"Connection: {connection}\r\n"]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers

    def send_headers(self):
        if self.headers_sent:
            return
        tosend = self.default_headers()
        tosend.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        self._head = util.to_bytestring("".join(tosend) + "\r\n", "latin-1")
        self.headers_sent = True

    def _flush_head(self):
        head, self._head = self._head, b""
        if head:
            util.write(self.sock, head)

    def _emit_body(self, data):
        head, self._head = self._head, b""
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        send_all(self.sock, head + data if head else data)

    def close(self):
        if not self.headers_sent:
            self.send_headers()
        self._flush_head()
        super().close()

    def sendfile(self, respiter):
        return False  # gunicorn's sendfile would send the kept head after the file; the gateway serves no files


class SharedErrors(wsgi.WSGIErrorsWrapper):
    """gunicorn's wsgi.errors, one for all requests of a worker: it finds its streams when written to (rarely:
    the gateway logs through its own handler) instead of when built. gunicorn builds one per request, with a
    logging.getLogger call and a walk of its handlers: 5 us each on this machine (issue 14 round 3)."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg

    @property
    def streams(self) -> list:
        # gunicorn's WSGIErrorsWrapper.__init__, done at write time so that reopened log files are followed.
        import logging

        handlers = logging.getLogger("gunicorn.error").handlers
        streams = []
        if self._cfg.errorlog == "-":
            streams.append(sys.stderr)
            handlers = handlers[1:]
        streams.extend(h.stream for h in handlers if hasattr(h, "stream"))
        return streams


def share_base_environ(cfg: Config) -> None:
    """Every request's environ starts as a copy of one dict made here, not from gunicorn's base_environ(cfg):
    its values depend only on the worker's settings, fixed for the worker's life."""
    shared = wsgi.base_environ(cfg)
    shared["wsgi.errors"] = SharedErrors(cfg)
    wsgi.base_environ = lambda _cfg: shared.copy()  # wsgi.default_environ looks the name up per request


def freeze_settings(cfg: Config) -> None:
    """Each setting's value stored on the worker's Config as a plain attribute.

    gunicorn reads its settings per request through Config.__getattr__ (a dict lookup and a Setting.get call,
    0.8 us each here) about 24 times a request: the parser, keep-alive, the pre/post_request hooks, is_ssl. In
    a worker, settings never change after the fork (a reload starts new workers), and an attribute found in the
    instance's __dict__ never reaches __getattr__. Config's own properties (is_ssl, worker_class, ...) are data
    descriptors and still win over these entries, so they keep computing as before.
    """
    for name, setting in cfg.settings.items():
        cfg.__dict__[name] = setting.get()


class GatewayWorker(GeventWorker):
    """gunicorn's gevent worker, with Nagle's algorithm off on client sockets.

    gunicorn sends a response's headers and body as two writes; with Nagle on, the body waits for the client's
    delayed ACK of the headers (up to 200 ms on Linux), which showed as the p99 at one connection
    (docs/performance.md).
    """

    def init_process(self):
        # Requests gunicorn refuses while parsing (414 request line, 431 headers, 400 bad syntax or chunking,
        # 501 transfer coding) are answered by Worker.handle_error through util.write_error, its one writer
        # of such pages; replaced in this worker process, they come out as JSON the SDKs can read.
        util.write_error = write_json_error
        # wsgi.create builds each response from this module-level name (the gevent worker passes no class).
        wsgi.Response = OneWriteResponse
        freeze_settings(self.cfg)
        share_base_environ(self.cfg)
        super().init_process()

    def handle(self, listener, client, addr):
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a unix socket has no Nagle
        super().handle(listener, client, addr)


bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8080')}"
worker_class = GatewayWorker
# memory:// rate limits are exact only with one worker; more workers need [limits].storage_uri = "redis://...".
workers = int(os.environ.get("WORKERS", "1"))
# With several workers each binds its own listening socket with SO_REUSEPORT (gunicorn does this per worker when
# reuse_port is set), and the kernel spreads new connections over them by their addresses. On one shared socket
# the worker that happened to be awake took whole bursts: once all 16 of a client's keep-alive connections, the
# other worker serving nothing (docs/performance.md, the Redis goal).
reuse_port = workers > 1
# The default (1000) is the most simultaneous clients per worker; the 1001st, /health included, would hang.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "10000"))
timeout = 30
graceful_timeout = 30
keepalive = 75
# No --preload: gevent must patch before the app imports ssl and urllib3 (docs/runtime.md, "gevent").
preload_app = False


def on_starting(server):
    """Check config.toml and prepare the database once in the master, before any worker exists.

    A bad file or database path stops start-up with one sentence, not a traceback; and workers that boot
    together only ever find a database that is already created and in WAL mode (two of them creating it at
    once could hit "database is locked", which made the master exit).
    """
    import config
    import db

    # metrics hook: prometheus-client's multiprocess mode needs an empty directory shared by all workers,
    # named before any worker imports it; a leftover one (a restart) is emptied.
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:
        os.makedirs(metrics_dir, exist_ok=True)
        for name in os.listdir(metrics_dir):  # only prometheus-client's own files: the directory may hold others
            if name.endswith(".db") and name.split("_", 1)[0] in ("counter", "gauge", "histogram", "summary"):
                os.remove(os.path.join(metrics_dir, name))
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    try:
        cfg = config.load()
        db.init(cfg.server.database)
    except config.ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    _warn_once(cfg)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * worker_connections + 256))  # each relayed stream holds two sockets
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _warn_once(cfg):
    """Start-up warnings, printed once by the master (never by CLI commands, never once per worker or model)."""
    import logging

    log = logging.getLogger("gunicorn.error")
    for upstream in cfg.upstreams.values():
        models = [m.id for m in cfg.models.values() if m.upstream == upstream.name]
        if models and upstream.api_key_env and not upstream.api_key():
            log.warning("upstream %s has no key; set %s (its models answer 502 until then: %s)",
                        upstream.name, upstream.api_key_env, ", ".join(models))
    if cfg.vision.allow_loopback_image_hosts:
        log.warning("[vision].allow_loopback_image_hosts is ON: clients can make this gateway fetch image URLs "
                    "from 127.0.0.1/::1. This is for tests only; turn it off in production.")


def _tune_gc():
    """Process tuning, in each worker once the app is loaded (never on import of the app)."""
    import gc

    # Everything built so far lives as long as the worker; frozen, full collections no longer walk it.
    gc.freeze()
    # The default thresholds (700, 10, 10) collect so often that with thousands of open streams the collector
    # froze the event loop for tens to hundreds of milliseconds; (50000, 20, 100) keeps the stalls short with
    # the same memory per stream (figures in docs/performance.md), and a full collection still runs about every
    # 10^8 allocations, so cyclic garbage is still reclaimed.
    gc.set_threshold(50_000, 20, 100)


def _tune_logging():
    """Per-record work no log line of the worker prints, skipped (the logging module's documented switches).

    Every record otherwise walks the stack for its caller's file and line, and looks up its thread and
    multiprocessing names; neither the gateway's format nor gunicorn's uses them, and the request log line is
    written once per request. About 8 us of a line's 19 us (a loop of the request line's shape to /dev/null).
    %(process)d is in gunicorn's format, so process ids stay.
    """
    import logging

    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


def post_worker_init(worker):
    """Return the holds of processes that are gone. Only here, at a worker's start: `flask ...` commands and a bare
    `import app` must never release anything, since the holds they would see belong to live workers."""
    import logging
    import sqlite3

    import billing
    import retention

    _tune_gc()
    _tune_logging()
    log = logging.getLogger("gateway")
    server_cfg = worker.wsgi.config["GATEWAY"].server
    retention.start(server_cfg.database, server_cfg.usage_retention_days)  # policy hook: usage retention
    try:
        released = billing.release_orphans(worker.wsgi.config["GATEWAY"].server.database)
    except sqlite3.OperationalError as exc:
        # Another process held the write lock for db.LOCK_WAIT_SECONDS (a long CLI command, a checkpoint): the
        # orphans wait for the next worker start rather than this one failing.
        log.warning("could not return orphaned holds at start-up (%s); the next worker start will", exc)
        return
    if released:
        log.warning("returned %d hold(s) left by a process that is gone", released)


def child_exit(server, worker):
    """metrics hook: a gone worker's live gauges (open streams, holds in flight) stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """The metrics directory made in on_starting goes with the master."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(path).startswith("gateway-metrics-"):
        shutil.rmtree(path, ignore_errors=True)
