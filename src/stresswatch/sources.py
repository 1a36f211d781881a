"""The source seam: anything that yields sample batches, and the registry of adapters.

A source is an async iterator of :data:`~stresswatch.model.SAMPLES_SCHEMA` frames, each
batch in time order per user. Adapters (the ``stresswatch_adapters`` package, or any other
distribution) register a :class:`SourceFactory` under the ``stresswatch.sources``
entry-point group; the core looks them up by kind or file suffix and never imports one by
name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import polars as pl

from .errors import ParseError

ENTRY_POINT_GROUP = "stresswatch.sources"


@runtime_checkable
class Source(Protocol):
    """An async iterator of sample batches (polars frames in the samples schema)."""

    def __aiter__(self) -> AsyncIterator[pl.DataFrame]: ...


class SourceFactory(Protocol):
    """What an adapter registers: a kind name, the file suffixes it claims, and a constructor."""

    kind: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]

    def __call__(self, path: Path, **options: Any) -> Source: ...


@dataclass
class SourceRegistry:
    """Adapters by kind. Build one with :meth:`discover`; tests may build their own."""

    factories: dict[str, SourceFactory]
    broken: dict[str, str] = field(default_factory=dict)  # kind -> why it could not be loaded

    @classmethod
    def discover(cls) -> SourceRegistry:
        """Every installed adapter. One that fails to import is reported when asked for, so a
        broken optional adapter does not take the others down."""
        found: dict[str, SourceFactory] = {}
        broken: dict[str, str] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                factory = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure of a plug-in
                broken[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            found[getattr(factory, "kind", ep.name)] = factory
        return cls(found, broken)

    @property
    def kinds(self) -> list[str]:
        return sorted(self.factories)

    def open(self, path: str | Path, kind: str | None = None, **options: Any) -> Source:
        """A source for ``path``: by ``kind`` if given, else by the first adapter claiming its suffix."""
        path = Path(path)
        if kind is not None:
            if kind in self.broken:
                raise ParseError(f"the {kind!r} adapter cannot be loaded: {self.broken[kind]}", source=path)
            if kind not in self.factories:
                raise ParseError(f"unknown kind {kind!r} (known: {', '.join(self.kinds)})", source=path)
            return self.factories[kind](path, **options)
        suffix = "".join(path.suffixes[-2:]).lower() if len(path.suffixes) > 1 else path.suffix.lower()
        for factory in self.factories.values():
            if suffix in factory.suffixes or path.suffix.lower() in factory.suffixes:
                return factory(path, **options)
        raise ParseError(f"no adapter reads {path.suffix or 'files without a suffix'!r} files; name a kind", source=path)


async def collect(sources: Iterable[Source]) -> pl.DataFrame:
    """All batches of all sources in one frame (the replay reads everything, then orders it)."""
    from .model import empty_samples

    frames = [empty_samples()]
    for src in sources:
        async for batch in src:
            frames.append(batch)
    return pl.concat(frames, how="vertical")
