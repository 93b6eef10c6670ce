"""Pure, data-driven model classification: `rules.toml` turns model ids into attributes.

No I/O beyond reading the shipped rules file once, no gRPC: the in-process classifier and the
gRPC servicer both call `classify()`, so the two paths cannot disagree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

Category = Literal[
    "chat",
    "reasoning",
    "vision",
    "code",
    "embedding",
    "image",
    "audio",
    "realtime",
    "moderation",
    "other",
]
Tier = Literal["small", "medium", "large"]

# The fixed set, in the order the UI shows it, with its labels.
CATEGORIES: dict[Category, str] = {
    "chat": "Chat",
    "reasoning": "Reasoning",
    "vision": "Vision",
    "code": "Code",
    "embedding": "Embedding",
    "image": "Image",
    "audio": "Audio",
    "realtime": "Realtime",
    "moderation": "Moderation",
    "other": "Other",
}

_SIZE = re.compile(r"(?:^|[-_:/.])(?:(\d+)x)?(\d+(?:\.\d+)?)b(?![a-z]|-\d+e)")


class ModelRef(msgspec.Struct, frozen=True, kw_only=True):
    """What the classifier is given about one model: the catalogue's entry, nothing fetched."""

    id: str
    provider: str
    upstream_id: str
    display_name: str | None = None


class ModelClass(msgspec.Struct, frozen=True, kw_only=True):
    """What the classifier says about one model (every field present on the wire, null or not)."""

    id: str
    provider: str
    upstream_id: str
    family: str | None
    categories: list[Category]
    tier: Tier | None
    context_window: int | None
    display_name: str | None


class FamilyRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[[family]]` table of the rules file."""

    match: str
    family: str
    categories: list[Category]
    tier: Tier | None = None
    context_window: int | None = None
    display_name: str | None = None


class TraitRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[[trait]]` table of the rules file."""

    match: str
    add: list[Category] = msgspec.field(default_factory=list)
    set: list[Category] | None = None
    tier: Tier | None = None


class SizeTiers(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameter-count thresholds in billions."""

    small_below: float
    medium_below: float


class RuleFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole rules file."""

    version: int
    size: SizeTiers
    family: list[FamilyRule]
    trait: list[TraitRule] = msgspec.field(default_factory=list)


class Rules:
    """A parsed rules file with its regexes compiled once."""

    def __init__(self, data: RuleFile) -> None:
        self.version = data.version
        self._size = data.size
        self._families = [(re.compile(r.match), r) for r in data.family]
        self._traits = [(re.compile(t.match), t) for t in data.trait]

    @classmethod
    def parse(cls, text: str) -> Rules:
        """Parse and check a rules file; raises `msgspec.ValidationError` naming the field."""
        import tomllib  # here, not at the top: the gateway starts before any rule is needed

        data = msgspec.convert(tomllib.loads(text), RuleFile)
        for rule in data.family:
            if "other" in rule.categories:
                raise msgspec.ValidationError(f"rule {rule.match!r}: 'other' is implicit")
        return cls(data)

    def classify_one(self, model: ModelRef) -> ModelClass:
        key = normalise(model.upstream_id)
        family = next((rule for pattern, rule in self._families if pattern.match(key)), None)
        categories: set[Category] = set(family.categories) if family else set()
        tier = family.tier if family else None
        for pattern, trait in self._traits:
            if pattern.search(key):
                if trait.set is not None:
                    categories = set(trait.set)
                categories.update(trait.add)
                tier = trait.tier or tier
        tier = self._tier_from_size(key) or tier
        ordered: list[Category] = [c for c in CATEGORIES if c in categories] or ["other"]
        return ModelClass(
            id=model.id,
            provider=model.provider,
            upstream_id=model.upstream_id,
            family=family.family if family else None,
            categories=ordered,
            tier=tier,
            context_window=family.context_window if family else None,
            display_name=model.display_name or (family.display_name if family else None),
        )

    def _tier_from_size(self, key: str) -> Tier | None:
        found = _SIZE.search(key)
        if found is None:
            return None
        experts, size = found.groups()
        billions = float(size) * (int(experts) if experts else 1)
        if billions < self._size.small_below:
            return "small"
        return "medium" if billions < self._size.medium_below else "large"


def normalise(upstream_id: str) -> str:
    """The part of an id the rules see: lower case, without any `org/` prefix."""
    return upstream_id.rsplit("/", 1)[-1].lower()


@functools.cache
def default_rules() -> Rules:
    """The rules shipped with the package, parsed on first use."""
    from importlib import resources

    text = resources.files("server.classification").joinpath("rules.toml").read_text("utf-8")
    return Rules.parse(text)


def classify(models: Sequence[ModelRef], rules: Rules | None = None) -> list[ModelClass]:
    """Classify every model, in order; a model no rule knows gets the category `other`."""
    active = rules or default_rules()
    return [active.classify_one(model) for model in models]


def group(models: Iterable[ModelClass]) -> list[tuple[Category, str, list[str]]]:
    """`(category id, label, model ids)` in the fixed order, empty categories left out."""
    members: dict[Category, list[str]] = {c: [] for c in CATEGORIES}
    for model in models:
        for category in model.categories:
            members[category].append(model.id)
    return [(c, label, members[c]) for c, label in CATEGORIES.items() if members[c]]
