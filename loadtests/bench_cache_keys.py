"""Cost of building a completion cache key: msgspec JSON + SHA-256 against json.dumps.

    .venv/bin/python loadtests/bench_cache_keys.py [--messages 50] [--words 60]

Prints microseconds per key for a conversation of that size, both ways, and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import timeit

from providers.types import ChatRequest, Message
from server.cache import completion_key


def naive_key(provider: str, request: ChatRequest) -> str:
    body = {
        "provider": provider,
        "model": request.model,
        "messages": [{"role": m.role, "content": m.text} for m in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": request.stop,
        "seed": request.seed,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--words", type=int, default=60, help="words per message")
    parser.add_argument("--repeat", type=int, default=20_000)
    args = parser.parse_args()
    messages = [
        Message(role="user" if i % 2 == 0 else "assistant", content="word " * args.words + str(i))
        for i in range(args.messages)
    ]
    request = ChatRequest(model="gpt-4o-mini", messages=messages, temperature=0.7, max_tokens=500)
    fast = timeit.timeit(lambda: completion_key("openai", request), number=args.repeat)
    slow = timeit.timeit(lambda: naive_key("openai", request), number=args.repeat)
    hashing = timeit.timeit(
        lambda: hashlib.sha256(b"x" * sum(len(m.text) for m in messages)).digest(),
        number=args.repeat,
    )
    per = 1e6 / args.repeat
    chars = sum(len(m.text) for m in messages)
    print(f"conversation: {args.messages} messages, {chars} characters")
    print(f"msgspec + sha256 : {fast * per:8.1f} us/key")
    print(f"json.dumps + sha256: {slow * per:6.1f} us/key  ({slow / fast:.1f}x slower)")
    print(f"of which sha256 alone: {hashing * per:4.1f} us")


if __name__ == "__main__":
    main()
