"""Fake OpenAI/Anthropic upstream server for the gateway's integration tests and benchmarks."""

from tests.fakeupstream.server import FakeUpstream, RecordedRequest, Script

__all__ = ["FakeUpstream", "RecordedRequest", "Script"]
