"""The classifier as a grpc.aio server: `ModelClassifier` plus the standard health service."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.classification import rules, wire
from server.classification.stubs import classifier_pb2 as pb
from server.classification.stubs import classifier_pb2_grpc

log = logging.getLogger("tokenrelay.classifier")

# Clients may ping every 20 s without calls in flight (the gateway pings every 30 s at most);
# the default of 5 minutes would answer its keepalive pings with GOAWAY "too_many_pings".
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class ClassifierServicer(classifier_pb2_grpc.ModelClassifierServicer):  # type: ignore[misc]
    """Classifies the models it is sent with the rules shipped in this package."""

    def __init__(self, model_rules: rules.Rules | None = None) -> None:
        self._rules = model_rules or rules.default_rules()

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClassifyResponse:
        answer = rules.classify(wire.refs(request), self._rules)
        return wire.response(answer, self._rules.version)


class ClassifierServer:
    """A grpc.aio server with the classifier and health services; `port` 0 picks a free one."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, servicer: ClassifierServicer | None = None
    ) -> None:
        self.host = host
        self.port = port
        self._servicer = servicer or ClassifierServicer()
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        classifier_pb2_grpc.add_ModelClassifierServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", wire.SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 2.0) -> None:
        """Report NOT_SERVING, finish the calls in flight within `grace` seconds, then stop."""
        server, self._server = self._server, None
        if server is None:
            return
        await self.health.enter_graceful_shutdown()
        await server.stop(grace)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def serve(host: str, port: int, grace: float = 5.0) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully (`tokenrelay classifier`)."""
    server = ClassifierServer(host, port)
    await server.start()
    print(f"tokenrelay classifier listening on {host}:{server.port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping: finishing calls in flight for up to %.0f s", grace)
    await server.stop(grace)
