"""Deploy pipelines: the registry of kinds, one module each in this package.

Each module here defines `PIPELINE`, an object following `base.Pipeline`; the module's name
is not what counts, its `PIPELINE.kind` is (the name recorded with each deploy). The kinds
are found by listing this package, so a new kind is one module here plus its configuration
keys (gateway/config/schema.py: a DeploySettings field named in PIPELINE_KEYS): nothing else
names the kinds, the registry's schema included.
"""

from __future__ import annotations

import importlib
import pkgutil

from ...config import DeploySettings
from ...errors import GatewayError
from .base import Context, Pipeline, Records

# Modules of this package that are not pipelines.
_NOT_KINDS = frozenset({"base"})


def _discover() -> dict[str, Pipeline]:
    found: dict[str, Pipeline] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module in _NOT_KINDS:
            continue
        pipeline: Pipeline = importlib.import_module(f"{__name__}.{module}").PIPELINE
        if pipeline.kind in found:
            raise RuntimeError(f"two deploy pipelines of kind {pipeline.kind!r}")
        found[pipeline.kind] = pipeline
    return found


# kind -> pipeline, in a fixed order (module names) for `chosen`.
KINDS: dict[str, Pipeline] = _discover()


def chosen(settings: DeploySettings) -> Pipeline | None:
    """The pipeline an app's deploy settings ask for; None when they configure none."""
    return next((p for p in KINDS.values() if p.configured(settings)), None)


def kind_of(settings: DeploySettings) -> str | None:
    """The kind these deploy settings choose (what a deploy records), or None."""
    pipeline = chosen(settings)
    return pipeline.kind if pipeline is not None else None


def get(kind: str) -> Pipeline:
    """The pipeline of a recorded kind; a kind this gateway does not know is refused."""
    try:
        return KINDS[kind]
    except KeyError:
        raise GatewayError(f"unknown deploy pipeline kind {kind!r}") from None


async def close() -> None:
    """Release what the pipelines hold across runs (the gateway stops)."""
    for pipeline in KINDS.values():
        await pipeline.close()


__all__ = ["KINDS", "Context", "Pipeline", "Records", "chosen", "close", "get", "kind_of"]
