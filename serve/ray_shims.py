"""Two changes to Ray Serve's replicas that Ray has no setting for, made when this package is
imported (so in every replica's process, before a replica serves). Each relies on a private part
of Ray Serve; tests/test_service.py checks both through a running service, so an upgrade of Ray
that breaks one fails there.

- Loopback: a replica opens an inter-deployment gRPC server on every interface (`[::]:0` in
  ray/serve/_private/replica.py). In the local cluster's single-machine mode
  (asrops/raycluster.py) it is bound to 127.0.0.1, the node address, instead.
- Backpressure: a replica pulls a request's body from the proxy into an unbounded queue as fast
  as it arrives, whether or not the application reads it (`ASGIReceiveProxy` in
  ray/serve/_private/http_util.py): a 200 MiB upload that the ingress refuses after 26 MiB
  still flowed whole into its memory. Here the pull waits while more than
  RECEIVE_BUFFER_BYTES of body wait unread, so the body arrives as the application reads it.
"""

from __future__ import annotations

import asyncio
import os

from asrops.raycluster import LOOPBACK_ONLY

RECEIVE_BUFFER_BYTES = 4 * 2**20
"""Body bytes a replica holds for a request beyond what the application has read."""


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

    def queue(self) -> BodyQueue:
        if self._queue is None:
            self._queue = BodyQueue()
        return self._queue

    ASGIReceiveProxy.__init__ = bounded_init
    ASGIReceiveProxy.queue = property(queue)
    ASGIReceiveProxy.bounded = True
