"""Model classification: pure rules, and the same rules behind a gRPC service.

`rules` has no gRPC in it and is what the gateway runs in-process by default; `service` is the
grpc.aio server (`tokenrelay classifier`), `client` the gateway's side of it, `wire` the
conversion to and from the generated messages in `stubs`.
"""

from __future__ import annotations


class ClassifierUnavailableError(Exception):
    """The remote classifier gave no usable answer; `outcome` says why, in one word."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome
