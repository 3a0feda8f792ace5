"""Changes to Ray Serve that Ray has no setting for. The replicas' are made when this package is
imported (so in every replica's process, before a replica serves); all of them are made by
`install`, which the launcher gives Ray as its worker setup hook (the proxy's process never
imports this package otherwise). Each relies on a private part of Ray Serve;
tests/test_service.py checks them through a running service, so an upgrade of Ray that breaks
one fails there.

- Loopback: a replica opens an inter-deployment gRPC server on every interface (`[::]:0` in
  ray/serve/_private/replica.py). In the local cluster's single-machine mode
  (asrops/raycluster.py) it is bound to 127.0.0.1, the node address, instead.
- Backpressure: a replica pulls a request's body from the proxy into an unbounded queue as fast
  as it arrives, whether or not the application reads it (`ASGIReceiveProxy` in
  ray/serve/_private/http_util.py): a 200 MiB upload that the ingress refuses after 26 MiB
  still flowed whole into its memory. Here the pull waits while more than
  RECEIVE_BUFFER_BYTES of body wait unread, so the body arrives as the application reads it.
- The proxy's side of the same: the proxy reads a request's body from the client into its own
  unbounded queue (`HTTPProxy.proxy_asgi_receive` in ray/serve/_private/proxy.py), and the
  replica's every pull takes all of it at once. Here the proxy stops reading from the client
  while more than RECEIVE_BUFFER_BYTES wait in that queue, so the client's sending is held back
  by TCP instead of the proxy's and the replica's memory.
- Direct ingress (a local cluster, asrops/raycluster.py `direct_ingress_env`), the same again:
  the ingress replica's own HTTP server reads a request's body from the client into an
  unbounded queue (`ASGIDIReceiveProxy` in ray/serve/_private/direct_ingress_http_util.py).
  Here it reads while at most RECEIVE_BUFFER_BYTES wait unread.
- Warnings on the console: with Serve's logs kept off stderr (`RAY_SERVE_LOG_TO_STDERR=0`,
  asrops/raycluster.py), Serve also points a replica's `sys.stderr` at its log file, and our
  replicas' warnings (which Python's last-resort handler writes there) would no longer reach
  the driver's console. `warnings_to_console` (called by each deployment's constructor, once
  Serve has redirected stderr) writes them to the process's own stderr, which Ray ships.
- Direct ingress for the root application only: Ray opens a client port in every application's
  ingress replica, so each model version's replica (an application of its own, with no route)
  would take one too, and could take the service's port before the ingress does. Here only the
  replica of the application at route "/" (the ingress) opens one; any other application is
  reached through Serve's proxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterable

from asrops.raycluster import LOOPBACK_ONLY

RECEIVE_BUFFER_BYTES = 4 * 2**20
"""Body bytes a replica (and the proxy) holds for a request beyond what the application has read."""
PROXY_DRAIN_POLL_S = 0.005
WORKER_SETUP_HOOK = "asrops.serve.ray_shims.install"
"""Ray's `worker_process_setup_hook`: run in every worker process Ray starts for the service."""


def install() -> None:
    """All of them, in whichever of Ray's processes this runs."""
    install_in_replica()
    bound_proxy_body_buffer()


def install_in_replica() -> None:
    keep_replica_ports_on_loopback()
    bound_request_body_buffer()
    bound_direct_ingress_body_buffer()
    open_client_port_for_the_root_app_only()


def keep_replica_ports_on_loopback() -> None:
    if any(os.environ.get(k) != v for k, v in LOOPBACK_ONLY.items()):
        return  # a cluster: replicas on other nodes must reach each other
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback_only", False):
        return

    def bind_on_loopback(server, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    bind_on_loopback.loopback_only = True
    replica.add_port_to_grpc_server = bind_on_loopback


class BodyQueue(asyncio.Queue):
    """The replica's queue of a request's ASGI messages, counting the body bytes it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.body_bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def put_nowait(self, item) -> None:
        super().put_nowait(item)
        if isinstance(item, dict) and item.get("type") == "http.request":
            self.body_bytes += len(item.get("body", b""))
            if self.body_bytes > RECEIVE_BUFFER_BYTES:
                self._room.clear()

    def get_nowait(self):
        item = super().get_nowait()
        if isinstance(item, dict) and item.get("type") == "http.request":
            self.body_bytes -= len(item.get("body", b""))
            if self.body_bytes <= RECEIVE_BUFFER_BYTES:
                self._room.set()
        return item

    async def room(self) -> None:
        await self._room.wait()


def _body_queue(receive_proxy) -> BodyQueue:
    """Ray's receive proxies create their queue on first use (in the event loop that uses it)."""
    if receive_proxy._queue is None:
        receive_proxy._queue = BodyQueue()
    return receive_proxy._queue


def bound_request_body_buffer() -> None:
    from ray.serve._private.http_util import ASGIReceiveProxy

    if getattr(ASGIReceiveProxy, "bounded", False):
        return
    init = ASGIReceiveProxy.__init__

    def bounded_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        pull = self._receive_asgi_messages

        async def pull_when_there_is_room(*pull_args, **pull_kwargs):
            await self.queue.room()
            return await pull(*pull_args, **pull_kwargs)

        self._receive_asgi_messages = pull_when_there_is_room

    ASGIReceiveProxy.__init__ = bounded_init
    ASGIReceiveProxy.queue = property(_body_queue)
    ASGIReceiveProxy.bounded = True


def _body_bytes(messages: Iterable) -> int:
    return sum(len(m.get("body", b"")) for m in messages if isinstance(m, dict) and m.get("type") == "http.request")


def bound_proxy_body_buffer() -> None:
    from ray.serve._private.proxy import HTTPProxy

    if getattr(HTTPProxy, "bounded", False):
        return

    async def proxy_asgi_receive(self, receive, queue):
        # Ray's loop (same messages, same close), reading from the client only while the queue
        # has room. The queue is drained by the replica's pulls; polling keeps Ray's queue as is.
        try:
            while True:
                while _body_bytes(queue._message_queue) > RECEIVE_BUFFER_BYTES and not queue._closed:
                    await asyncio.sleep(PROXY_DRAIN_POLL_S)
                msg = await receive()
                await queue(msg)
                if msg["type"] == "http.disconnect":
                    return None
                if msg["type"] == "websocket.disconnect":
                    return msg["code"]
        finally:
            queue.close()

    HTTPProxy.proxy_asgi_receive = proxy_asgi_receive
    HTTPProxy.bounded = True


def bound_direct_ingress_body_buffer() -> None:
    from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy

    if getattr(ASGIDIReceiveProxy, "bounded", False):
        return

    async def fetch_until_disconnect(self):
        # Ray's loop (same messages, same end), reading from the client only while the queue has
        # room; uvicorn then stops reading the socket, and TCP holds the client back.
        same_loop = asyncio.get_running_loop() == self._user_event_loop
        while True:
            if same_loop:
                await self.queue.room()
            else:
                while self.queue.body_bytes > RECEIVE_BUFFER_BYTES:
                    await asyncio.sleep(PROXY_DRAIN_POLL_S)
            msg = await self._receive()
            if same_loop:
                await self.queue.put(msg)
            else:
                self._user_event_loop.call_soon_threadsafe(self.put_message, msg)
            if msg["type"] == "http.disconnect":
                self._disconnect_message = msg
                return None
            if msg["type"] == "websocket.disconnect":
                self._disconnect_message = msg
                return msg["code"]

    ASGIDIReceiveProxy._fetch_until_disconnect = fetch_until_disconnect
    ASGIDIReceiveProxy.queue = property(_body_queue)
    ASGIDIReceiveProxy.bounded = True


def open_client_port_for_the_root_app_only() -> None:
    from ray.serve._private.replica import Replica

    start = Replica._maybe_start_direct_ingress_servers
    if getattr(start, "root_only", False):
        return

    async def start_for_the_root_app(self) -> None:
        if self._route_prefix == "/":
            await start(self)

    start_for_the_root_app.root_only = True
    Replica._maybe_start_direct_ingress_servers = start_for_the_root_app


def warnings_to_console() -> None:
    """In a replica whose `sys.stderr` Serve has pointed at its log file: warnings and errors
    (ours and the libraries') also go to the process's own stderr, as Python's last-resort
    handler sent them before (rare lines; Serve's access lines stay in its files)."""
    root = logging.getLogger()
    if sys.stderr is sys.__stderr__ or any(getattr(h, "stream", None) is sys.__stderr__ for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
