"""
The limits on connections that uvicorn lacks, for serve.py: at most max_connections open at once, each
given request_timeout seconds to send a whole request, and a process out of files that says so in a line.
  max_connections, backlog = open_files(max_connections)
  config = uvicorn.Config(app, http=connection(max_connections, request_timeout), backlog=backlog)
  asyncio.get_running_loop().set_exception_handler(out_of_files)  # once the server's event loop runs
"""
import os
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from common import log


def open_files(max_connections):
    """(max_connections, backlog) that the process's open files can hold. A connection holds a file, and
    asyncio accepts up to `backlog` at once before it can close any: raise the soft limit on open files
    where the hard one allows, and lower max_connections where it still cannot hold them."""
    limit, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = len(os.listdir('/dev/fd')) + 16  # files open now, and a few to spare
    if limit < held + max_connections + 256:
        want = held + max_connections + 256
        limit = want if hard == resource.RLIM_INFINITY else min(hard, want)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    backlog = min(256, limit // 4)  # connections the kernel holds until they are accepted
    if held + max_connections + backlog > limit:
        max_connections = max(1, limit - held - backlog)
        log(f"max_connections lowered to {max_connections}: ulimit -n is {limit} (raise it to serve more connections)")
    return max_connections, backlog


def connection(max_connections, request_timeout):
    """uvicorn's HTTP/1.1 connection with the limits it lacks: at most max_connections open (more are
    closed at once, before they use up the process's files; Connection.refused counts them), and
    request_timeout seconds to send each whole request (a client that sends slowly, or never finishes,
    is closed)."""

    class Connection(H11Protocol):
        refused = 0

        def connection_made(self, transport):
            super().connection_made(transport)
            self.deadline = self.loop.call_later(request_timeout, self.too_slow)
            if len(self.connections) > max_connections:
                Connection.refused += 1
                transport.close()

        def on_response_complete(self):
            super().on_response_complete()
            self.deadline.cancel()  # the next request on this connection has its own time
            self.deadline = self.loop.call_later(request_timeout, self.too_slow)

        def connection_lost(self, exc):
            self.deadline.cancel()
            super().connection_lost(exc)

        def too_slow(self):
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE) and not self.transport.is_closing():
                self.transport.close()
    return Connection


said = 0.0  # when out_of_files last spoke


def out_of_files(loop, context):
    """asyncio logs a traceback for each connection it could not accept, thousands a second when the process
    runs out of files (ulimit -n): say it in one line, at most every 10 s."""
    global said
    if context.get('message') != 'socket.accept() out of system resource':
        return loop.default_exception_handler(context)
    if time.monotonic() - said > 10:
        said = time.monotonic()
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log(f"new connections wait: {context['exception']} (ulimit -n is {limit}; raise it, or lower max_connections)")
