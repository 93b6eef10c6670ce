"""Fake OpenAI/Anthropic upstream server for the gateway's integration tests and benchmarks."""

from tests.fakeupstream.formats import FakeToolCall
from tests.fakeupstream.server import FakeUpstream, RecordedRequest, Script

__all__ = ["FakeToolCall", "FakeUpstream", "RecordedRequest", "Script"]
