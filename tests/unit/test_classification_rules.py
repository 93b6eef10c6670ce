"""The classification rules over real model ids from OpenAI, Anthropic and open models."""

from __future__ import annotations

import msgspec
import pytest

from server.classification.rules import (
    CATEGORIES,
    ModelRef,
    Rules,
    classify,
    default_rules,
    group,
    normalise,
)

# upstream id -> (family, categories, tier, context window)
CASES: dict[str, tuple[str | None, list[str], str | None, int | None]] = {
    # OpenAI
    "gpt-4o-mini": ("gpt-4o", ["chat", "vision"], "small", 128000),
    "gpt-4o-mini-2024-07-18": ("gpt-4o", ["chat", "vision"], "small", 128000),
    "gpt-4o": ("gpt-4o", ["chat", "vision"], "large", 128000),
    "gpt-4o-2024-11-20": ("gpt-4o", ["chat", "vision"], "large", 128000),
    "chatgpt-4o-latest": ("gpt-4o", ["chat", "vision"], "large", 128000),
    "gpt-4.1": ("gpt-4.1", ["chat", "vision", "code"], "large", 1047576),
    "gpt-4.1-mini": ("gpt-4.1", ["chat", "vision", "code"], "small", 1047576),
    "gpt-4.1-nano-2025-04-14": ("gpt-4.1", ["chat", "vision", "code"], "small", 1047576),
    "gpt-4.5-preview": ("gpt-4.5", ["chat", "vision"], "large", 128000),
    "gpt-5": ("gpt-5", ["chat", "reasoning", "vision", "code"], "large", 400000),
    "gpt-5-2025-08-07": ("gpt-5", ["chat", "reasoning", "vision", "code"], "large", 400000),
    "gpt-5-mini": ("gpt-5", ["chat", "reasoning", "vision", "code"], "small", 400000),
    "gpt-5-nano": ("gpt-5", ["chat", "reasoning", "vision", "code"], "small", 400000),
    "gpt-5-chat-latest": ("gpt-5", ["chat", "vision"], "large", 128000),
    "gpt-5-codex": ("gpt-5", ["reasoning", "code"], "large", 400000),
    "gpt-5.1": ("gpt-5", ["chat", "reasoning", "vision", "code"], "large", 400000),
    "gpt-4-turbo": ("gpt-4", ["chat", "vision"], "large", 128000),
    "gpt-4-0613": ("gpt-4", ["chat"], "large", 8192),
    "gpt-3.5-turbo": ("gpt-3.5", ["chat"], "small", 16385),
    "o1": ("o-series", ["reasoning", "vision", "code"], "large", 200000),
    "o1-mini": ("o1", ["reasoning", "code"], "small", 128000),
    "o3": ("o-series", ["reasoning", "vision", "code"], "large", 200000),
    "o3-pro": ("o-series", ["reasoning", "vision", "code"], "large", 200000),
    "o3-mini": ("o-series", ["reasoning", "code"], "small", 200000),
    "o4-mini": ("o-series", ["reasoning", "code"], "small", 200000),
    "o3-deep-research": ("deep-research", ["reasoning"], "large", 200000),
    "codex-mini-latest": ("codex", ["reasoning", "code"], "small", 200000),
    "gpt-4o-realtime-preview": ("gpt-4o-realtime", ["audio", "realtime"], "large", 128000),
    "gpt-4o-mini-realtime-preview": ("gpt-4o-realtime", ["audio", "realtime"], "small", 128000),
    "gpt-realtime": ("gpt-realtime", ["audio", "realtime"], "large", 32000),
    "gpt-audio": ("gpt-audio", ["chat", "audio"], "large", 128000),
    "gpt-4o-audio-preview": ("gpt-4o-audio", ["chat", "audio"], "large", 128000),
    "gpt-4o-mini-tts": ("gpt-4o-audio", ["audio"], "small", None),
    "gpt-4o-transcribe": ("gpt-4o-audio", ["audio"], None, None),
    "gpt-4o-search-preview": ("gpt-4o-search", ["chat"], "large", 128000),
    "whisper-1": ("speech", ["audio"], None, None),
    "tts-1-hd": ("speech", ["audio"], None, None),
    "dall-e-3": ("image", ["image"], None, None),
    "gpt-image-1": ("image", ["image"], None, None),
    "sora-2": ("sora", ["image"], "large", None),
    "omni-moderation-latest": ("moderation", ["moderation"], "small", None),
    "text-moderation-latest": ("moderation", ["moderation"], "small", None),
    "text-embedding-3-small": ("text-embedding-3", ["embedding"], "small", 8191),
    "text-embedding-3-large": ("text-embedding-3", ["embedding"], "medium", 8191),
    "text-embedding-ada-002": ("text-embedding", ["embedding"], "small", 8191),
    "computer-use-preview": ("computer-use", ["vision"], "medium", 8192),
    "gpt-oss-20b": ("gpt-oss", ["chat", "reasoning"], "small", 131072),
    "gpt-oss-120b": ("gpt-oss", ["chat", "reasoning"], "large", 131072),
    # Anthropic
    "claude-opus-4-5-20251101": (
        "claude-opus-4",
        ["chat", "reasoning", "vision", "code"],
        "large",
        200000,
    ),
    "claude-opus-4-1-20250805": (
        "claude-opus-4",
        ["chat", "reasoning", "vision", "code"],
        "large",
        200000,
    ),
    "claude-opus-4-20250514": (
        "claude-opus-4",
        ["chat", "reasoning", "vision", "code"],
        "large",
        200000,
    ),
    "claude-sonnet-4-5": (
        "claude-sonnet-4",
        ["chat", "reasoning", "vision", "code"],
        "medium",
        200000,
    ),
    "claude-sonnet-4-5-20250929": (
        "claude-sonnet-4",
        ["chat", "reasoning", "vision", "code"],
        "medium",
        200000,
    ),
    "claude-sonnet-4-20250514": (
        "claude-sonnet-4",
        ["chat", "reasoning", "vision", "code"],
        "medium",
        200000,
    ),
    "claude-haiku-4-5-20251001": (
        "claude-haiku-4",
        ["chat", "reasoning", "vision", "code"],
        "small",
        200000,
    ),
    "claude-3-7-sonnet-20250219": (
        "claude-3.7",
        ["chat", "reasoning", "vision", "code"],
        "medium",
        200000,
    ),
    "claude-3-5-sonnet-20241022": ("claude-3.5", ["chat", "vision", "code"], "medium", 200000),
    "claude-3-5-haiku-latest": ("claude-3.5", ["chat", "vision"], "small", 200000),
    "claude-3-opus-20240229": ("claude-3", ["chat", "vision"], "large", 200000),
    "claude-3-haiku-20240307": ("claude-3", ["chat", "vision"], "small", 200000),
    # Open models as vLLM, Ollama, OpenRouter and others name them
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1", ["chat"], "small", 131072),
    "meta-llama/Llama-3.1-405B-Instruct": ("llama-3.1", ["chat"], "large", 131072),
    "llama3.1:8b": ("llama-3.1", ["chat"], "small", 131072),
    "llama3.3:70b": ("llama-3.3", ["chat"], "large", 131072),
    "llama3.2:3b": ("llama-3.2", ["chat"], "small", 131072),
    "meta-llama/Llama-3.2-11B-Vision-Instruct": ("llama-3.2", ["chat", "vision"], "small", 131072),
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": ("llama-4", ["chat", "vision"], "large", None),
    "Qwen/Qwen2.5-72B-Instruct": ("qwen2.5", ["chat"], "large", 131072),
    "qwen2.5-coder:7b": ("qwen2.5", ["chat", "code"], "small", 131072),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2.5", ["chat", "vision"], "small", 131072),
    "Qwen/Qwen3-235B-A22B": ("qwen3", ["chat", "reasoning"], "large", 131072),
    "qwen3:30b-a3b": ("qwen3", ["chat", "reasoning"], "medium", 131072),
    "qwq:32b": ("qwq", ["chat", "reasoning"], "medium", 131072),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral", ["chat"], "small", 32768),
    "mistral-large-latest": ("mistral", ["chat"], "large", 131072),
    "mixtral:8x7b": ("mixtral", ["chat"], "medium", 32768),
    "mistralai/Mixtral-8x22B-Instruct-v0.1": ("mixtral", ["chat"], "large", 32768),
    "codestral-latest": ("codestral", ["code"], "medium", 256000),
    "pixtral-12b-2409": ("pixtral", ["chat", "vision"], "small", 131072),
    "deepseek-ai/DeepSeek-R1": ("deepseek-r1", ["chat", "reasoning"], "large", 131072),
    "deepseek-r1:14b": ("deepseek-r1", ["chat", "reasoning"], "small", 131072),
    "deepseek-reasoner": ("deepseek-r1", ["chat", "reasoning"], "large", 131072),
    "deepseek-chat": ("deepseek", ["chat"], "large", 131072),
    "deepseek-ai/DeepSeek-V3": ("deepseek", ["chat"], "large", 131072),
    "deepseek-coder-v2:16b": ("deepseek-coder", ["code"], "small", 131072),
    "google/gemma-2-9b-it": ("gemma", ["chat"], "small", 8192),
    "gemma3:27b": ("gemma-3", ["chat", "vision"], "medium", 131072),
    "gemma3n:e4b": ("gemma-3n", ["chat", "vision", "audio"], "small", 32768),
    "microsoft/phi-4": ("phi-4", ["chat"], "small", 16384),
    "phi3:mini": ("phi", ["chat"], "small", None),
    "codellama:13b": ("code-llama", ["code"], "small", 16384),
    "starcoder2:15b": ("code", ["code"], "small", None),
    "llava:13b": ("llava", ["chat", "vision"], "small", None),
    "nomic-embed-text": ("embedding", ["embedding"], "small", None),
    "BAAI/bge-m3": ("embedding", ["embedding"], "small", None),
    "Qwen/Qwen3-Embedding-8B": ("qwen3", ["embedding"], "small", 131072),
    "llama-guard3:8b": ("guard", ["moderation"], "small", None),
    "openai/gpt-oss-20b": ("gpt-oss", ["chat", "reasoning"], "small", 131072),
    # The demo provider
    "echo": ("demo", ["chat", "vision"], "small", None),
    "tools": ("demo", ["chat", "vision"], "small", None),
    "reasoner": ("demo", ["chat", "reasoning"], "small", None),
    # Nobody knows these: listed as "other", never dropped
    "my-finetune": (None, ["other"], None, None),
    "ft:unknown-thing:acme::abc123": (None, ["other"], None, None),
}


@pytest.mark.parametrize("upstream_id", list(CASES))
def test_known_model_ids(upstream_id: str) -> None:
    [found] = classify([ModelRef(id=f"p/{upstream_id}", provider="p", upstream_id=upstream_id)])
    assert (found.family, found.categories, found.tier, found.context_window) == CASES[upstream_id]
    assert found.id == f"p/{upstream_id}"
    assert found.provider == "p"
    assert found.upstream_id == upstream_id


def test_display_names_from_rules_and_from_upstream() -> None:
    refs = [
        ModelRef(id="a/gpt-4o-mini", provider="a", upstream_id="gpt-4o-mini"),
        ModelRef(
            id="b/claude-sonnet-4-5-20250929",
            provider="b",
            upstream_id="claude-sonnet-4-5-20250929",
        ),
        ModelRef(id="c/x", provider="c", upstream_id="claude-3-haiku", display_name="Mine"),
        ModelRef(id="d/unknown", provider="d", upstream_id="unknown"),
    ]
    names = [c.display_name for c in classify(refs)]
    assert names == ["GPT-4o mini", "Claude Sonnet 4.5", "Mine", None]


def test_every_model_is_kept_in_order_with_categories_from_the_fixed_set() -> None:
    refs = [ModelRef(id=f"p/{m}", provider="p", upstream_id=m) for m in CASES]
    classes = classify(refs)
    assert [c.id for c in classes] == [r.id for r in refs]
    for c in classes:
        assert c.categories
        assert set(c.categories) <= CATEGORIES.keys()
        assert c.categories == sorted(c.categories, key=list(CATEGORIES).index)


def test_group_follows_the_fixed_order_and_omits_empty_categories() -> None:
    ids = ["o4-mini", "gpt-4o-mini", "nomic-embed-text", "mystery"]
    classes = classify([ModelRef(id=f"p/{m}", provider="p", upstream_id=m) for m in ids])
    assert group(classes) == [
        ("chat", "Chat", ["p/gpt-4o-mini"]),
        ("reasoning", "Reasoning", ["p/o4-mini"]),
        ("vision", "Vision", ["p/gpt-4o-mini"]),
        ("code", "Code", ["p/o4-mini"]),
        ("embedding", "Embedding", ["p/nomic-embed-text"]),
        ("other", "Other", ["p/mystery"]),
    ]


def test_normalise() -> None:
    assert normalise("meta-llama/Llama-3.1-8B-Instruct") == "llama-3.1-8b-instruct"
    assert normalise("openrouter/openai/GPT-4o") == "gpt-4o"


def test_shipped_rules_parse() -> None:
    assert default_rules().version == 1


RULES = """
version = 2
[size]
small_below = 10.0
medium_below = 50.0
[[family]]
match = 'acme-'
family = "acme"
categories = ["chat"]
tier = "large"
[[trait]]
match = 'vision'
add = ["vision"]
"""


def test_rules_are_data() -> None:
    rules = Rules.parse(RULES)
    refs = [
        ModelRef(id="x/acme-vision", provider="x", upstream_id="acme-vision"),
        ModelRef(id="x/acme-7b", provider="x", upstream_id="acme-7b"),
        ModelRef(id="x/gpt-4o", provider="x", upstream_id="gpt-4o"),
    ]
    classes = classify(refs, rules)
    assert [(c.family, c.categories, c.tier) for c in classes] == [
        ("acme", ["chat", "vision"], "large"),
        ("acme", ["chat"], "small"),
        (None, ["other"], None),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        RULES.replace('categories = ["chat"]', 'categories = ["telepathy"]'),
        RULES.replace('categories = ["chat"]', 'categories = ["other"]'),
        RULES.replace('tier = "large"', 'tier = "huge"'),
        RULES.replace("[size]", "[sizes]"),
    ],
)
def test_bad_rules_are_refused(bad: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        Rules.parse(bad)
