"""The gateway's side of the classifier service: one channel, a deadline on every call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.classification import ClassifierUnavailableError, wire
from server.classification.rules import ModelClass, ModelRef
from server.classification.stubs import classifier_pb2 as pb

# Retries only on UNAVAILABLE (e.g. a server that is restarting), done by the channel itself.
_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": wire.SERVICE}, {"service": "grpc.health.v1.Health"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    # Pings only while a call is in flight, no more often than the server permits (20 s).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # A classifier that comes back is found within seconds, not after grpc's 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]

Observer = Callable[[str, float], None]


class RemoteClassifier:
    """Calls `ModelClassifier.Classify` at `address`; any failure: `ClassifierUnavailableError`.

    Classifying no models only checks the service's health (a cheap way to keep a status true).

    Each classification first asks the health service, then classifies, both within one
    `deadline` (seconds) and with `wait_for_ready`, so a server that is not up yet is waited for
    until the deadline and no longer. `observe(outcome, seconds)` is told about every attempt.
    """

    def __init__(self, address: str, *, deadline: float, observe: Observer) -> None:
        self.address = address
        self._deadline = deadline
        self._observe = observe
        self._channel: grpc.aio.Channel | None = None
        self._classify: Any = None
        self._health: Any = None

    def _connect(self) -> None:
        # Made on first use, inside the running event loop that will use it.
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._classify = self._channel.unary_unary(
            wire.CLASSIFY,
            request_serializer=pb.ClassifyRequest.SerializeToString,
            response_deserializer=pb.ClassifyResponse.FromString,
        )
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def classify(self, models: Sequence[ModelRef]) -> list[ModelClass]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = "cancelled"
        try:
            if self._channel is None:
                self._connect()
            end = started + self._deadline
            check = health_pb2.HealthCheckRequest(service=wire.SERVICE)
            status = await self._health.Check(check, timeout=self._deadline, wait_for_ready=True)
            if status.status != health_pb2.HealthCheckResponse.SERVING:
                outcome = "not_serving"
                raise ClassifierUnavailableError(outcome)
            if not models:  # nothing to classify: the health check was the whole call
                outcome = "ok"
                return []
            answer: pb.ClassifyResponse = await self._classify(
                wire.request(models), timeout=max(end - loop.time(), 0.001), wait_for_ready=True
            )
            classes = wire.classes(answer, models)
            outcome = "ok"
            return classes
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name.lower()
            raise ClassifierUnavailableError(outcome) from exc
        except wire.InvalidAnswerError as exc:
            outcome = "invalid_answer"
            raise ClassifierUnavailableError(outcome) from exc
        finally:
            self._observe(outcome, loop.time() - started)

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
