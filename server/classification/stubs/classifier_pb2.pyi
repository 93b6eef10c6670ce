from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Model(_message.Message):
    __slots__ = ("id", "provider", "upstream_id", "display_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    provider: str
    upstream_id: str
    display_name: str
    def __init__(self, id: _Optional[str] = ..., provider: _Optional[str] = ..., upstream_id: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("id", "family", "categories", "tier", "context_window", "display_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    family: str
    categories: _containers.RepeatedScalarFieldContainer[str]
    tier: str
    context_window: int
    display_name: str
    def __init__(self, id: _Optional[str] = ..., family: _Optional[str] = ..., categories: _Optional[_Iterable[str]] = ..., tier: _Optional[str] = ..., context_window: _Optional[int] = ..., display_name: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("models", "rules_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Classification]
    rules_version: int
    def __init__(self, models: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., rules_version: _Optional[int] = ...) -> None: ...
