"""The pass registry: pass name -> class, filled at import and from installed plugins.

Third-party packages add passes through the entry-point group ``kompakt.passes``:

    [project.entry-points."kompakt.passes"]
    my-pass = "my_package.passes:MyPass"

After ``pip install``, ``my-pass`` works in pipeline strings and shows in ``kompakt passes``.
"""

from __future__ import annotations

import importlib.metadata
import logging

from kompakt.errors import PipelineError, did_you_mean
from kompakt.passes.base import Pass

ENTRY_POINT_GROUP = "kompakt.passes"
_log = logging.getLogger(__name__)

_PASSES: dict[str, type[Pass]] = {}
_plugins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: makes ``cls`` available by ``cls.name`` in pipeline strings."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PipelineError(f"register_pass expects a Pass subclass, got {cls!r}")
    name = cls.name
    if not name or name != name.lower() or " " in name or "_" in name:
        raise PipelineError(
            f"pass class {cls.__qualname__} needs a kebab-case `name` (like 'quantize-weights'), got {name!r}"
        )
    existing = _PASSES.get(name)
    if existing is not None and _qualname(existing) != _qualname(cls):
        raise PipelineError(
            f"pass name '{name}' is taken by {_qualname(existing)}; cannot register {_qualname(cls)}"
        )
    _PASSES[name] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; raises `PipelineError` suggesting the nearest."""
    passes = all_passes()
    try:
        return passes[name]
    except KeyError:
        raise PipelineError(
            f"unknown pass '{name}'{did_you_mean(name, passes)}; `kompakt passes` lists them"
        ) from None


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name: the built-in ones and installed plugins'."""
    _load_builtin()
    _load_plugins()
    return dict(sorted(_PASSES.items()))


def providers_of(prop: str) -> list[str]:
    """Names of passes that provide the property ``prop``."""
    return [name for name, cls in all_passes().items() if prop in cls.provides]


def _load_builtin() -> None:
    import kompakt.passes.builtin  # noqa: F401  (its imports register the passes)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as err:  # a broken plugin must not break kompakt itself
            _log.warning(
                "kompakt: could not load pass plugin '%s' (%s): %s", entry.name, entry.value, err
            )
            continue
        if isinstance(loaded, type) and issubclass(loaded, Pass):
            if loaded.name != entry.name:
                _log.warning(
                    "kompakt: plugin entry point '%s' names pass '%s'; registering it as '%s'",
                    entry.name,
                    loaded.name,
                    loaded.name,
                )
            register_pass(loaded)


def reload_plugins() -> None:
    """Looks at installed entry points again (after installing a plugin in-process)."""
    global _plugins_loaded
    _plugins_loaded = False
    _load_plugins()
