"""gunicorn settings for the gateway: one gevent worker by default, sized for thousands of open streams."""
import os
import resource
import socket
import sys

from gunicorn.workers.ggevent import GeventWorker


class GatewayWorker(GeventWorker):
    """gunicorn's gevent worker, with Nagle's algorithm off on client sockets.

    gunicorn sends a response's headers and body as two writes; with Nagle on, the body waits for the client's
    delayed ACK of the headers (up to 200 ms on Linux), which showed as a 197 ms p99 at one connection.
    """

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
# The default (1000) is the most simultaneous clients per worker; the 1001st, /health included, would hang.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "10000"))
timeout = 30
graceful_timeout = 30
keepalive = 75
# No --preload: gevent must patch before the app imports ssl and requests (RUNTIME.md 2.1).
preload_app = False


def on_starting(server):
    """Check config.toml once in the master, so a bad file stops start-up with one sentence, not a traceback."""
    import config

    try:
        config.load()
    except config.ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * worker_connections + 256))  # each relayed stream holds two sockets
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def post_worker_init(worker):
    """Return the holds of processes that are gone. Only here, at a worker's start: `flask ...` commands and a bare
    `import app` must never release anything, since the holds they would see belong to live workers."""
    import logging

    import billing

    released = billing.release_orphans(worker.wsgi.config["GATEWAY"].server.database)
    if released:
        logging.getLogger("gateway").warning("returned %d hold(s) left by a process that is gone", released)
