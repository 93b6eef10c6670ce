"""Conversion between the classifier's Structs and its protobuf messages (both directions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast, get_args

from server.classification.rules import CATEGORIES, Category, ModelClass, ModelRef, Tier
from server.classification.stubs import classifier_pb2 as pb

SERVICE = "tokenrelay.classifier.v1.ModelClassifier"
CLASSIFY = f"/{SERVICE}/Classify"
_TIERS = frozenset(get_args(Tier))


class InvalidAnswerError(Exception):
    """The classifier answered, but not with one valid classification per requested model."""


def request(models: Sequence[ModelRef]) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        models=[
            pb.Model(
                id=m.id, provider=m.provider, upstream_id=m.upstream_id, display_name=m.display_name
            )
            for m in models
        ]
    )


def refs(message: pb.ClassifyRequest) -> list[ModelRef]:
    return [
        ModelRef(
            id=m.id,
            provider=m.provider,
            upstream_id=m.upstream_id,
            display_name=m.display_name if m.HasField("display_name") else None,
        )
        for m in message.models
    ]


def response(classes: Sequence[ModelClass], rules_version: int) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        models=[
            pb.Classification(
                id=c.id,
                family=c.family,
                categories=c.categories,
                tier=c.tier,
                context_window=c.context_window,
                display_name=c.display_name,
            )
            for c in classes
        ],
        rules_version=rules_version,
    )


def classes(answer: pb.ClassifyResponse, asked: Sequence[ModelRef]) -> list[ModelClass]:
    """The answer as Structs; `InvalidAnswerError` unless it matches the request model by model."""
    if len(answer.models) != len(asked):
        raise InvalidAnswerError(f"{len(answer.models)} answers for {len(asked)} models")
    out = []
    for ref, c in zip(asked, answer.models, strict=True):
        categories = [cast(Category, x) for x in c.categories]
        if c.id != ref.id or not categories or not set(categories) <= CATEGORIES.keys():
            raise InvalidAnswerError(f"invalid classification for {ref.id!r}")
        tier = c.tier if c.HasField("tier") else None
        if tier is not None and tier not in _TIERS:
            raise InvalidAnswerError(f"invalid tier for {ref.id!r}")
        out.append(
            ModelClass(
                id=ref.id,
                provider=ref.provider,
                upstream_id=ref.upstream_id,
                family=c.family if c.HasField("family") else None,
                categories=categories,
                tier=cast(Tier | None, tier),
                context_window=c.context_window if c.HasField("context_window") else None,
                display_name=c.display_name if c.HasField("display_name") else None,
            )
        )
    return out
