"""Where settings come from: defaults, environment variables and YAML files, resolved in one place."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import ConfigError

T = TypeVar("T")

#: Environment variables that override the built-in defaults.
ENV_STORE_URI = "VITRINE_STORE_URI"
ENV_ARTIFACTS_URI = "VITRINE_ARTIFACTS"


def resolve_uri(uri: str) -> str:
    """Make a local path absolute (so every Ray worker sees the same folder); leave URIs with a scheme alone."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def default_store_uri() -> str:
    """The vector store: ``$VITRINE_STORE_URI`` or the embedded Milvus Lite server's folder ``var/milvus``."""
    return resolve_uri(os.environ.get(ENV_STORE_URI, "var/milvus"))


def default_artifacts_uri() -> str:
    """The artifact store: ``$VITRINE_ARTIFACTS`` or ``var/artifacts``."""
    return resolve_uri(os.environ.get(ENV_ARTIFACTS_URI, "var/artifacts"))


def default_catalog() -> str:
    """The shipped sample catalogue (Fashion-MNIST photos with generated fields), found beside the code."""
    return str(Path(__file__).resolve().parent.parent / "data" / "sample" / "catalog.parquet")


def cache_dir() -> Path:
    """Where Vitrine keeps fetched data sets and assembled models (``VITRINE_CACHE`` or ~/.cache/vitrine)."""
    return Path(os.environ.get("VITRINE_CACHE", Path.home() / ".cache" / "vitrine"))


def default_events() -> str:
    """The shipped sample's synthetic shoppers (events.parquet beside the sample catalogue)."""
    return str(Path(default_catalog()).parent / "events.parquet")


def values_from_args(args: Any, fields: Iterable[str], nested: Mapping[str, Iterable[str]] | None = None,
                     uris: Iterable[str] = ()) -> dict[str, Any]:
    """Config values for a job: the YAML file named by ``args.config`` (if any) overlaid with every flag given.

    ``fields`` are top-level flags; ``nested[section]`` are flags of that section's mapping; the local paths
    among ``uris`` are made absolute (so Ray workers see the same folders).
    """
    values = load_yaml(args.config) if getattr(args, "config", None) else {}

    def given(names: Iterable[str]) -> dict[str, Any]:
        return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}

    values.update(given(fields))
    for section, names in (nested or {}).items():
        values[section] = {**dict(values.get(section) or {}), **given(names)}
    for key in uris:
        if values.get(key):
            values[key] = resolve_uri(values[key])
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; ConfigError when the file is missing or is not a mapping."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings. Got {type(data).__name__}")
    return data


def from_mapping(cls: type[T], values: dict[str, Any]) -> T:
    """Build a config dataclass from a mapping, refusing unknown keys. A nested dataclass comes from a nested map,
    through its own ``from_mapping`` classmethod when it has one (e.g. EventWeights, whose missing events keep
    their default weights)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown settings for {cls.__name__}: {', '.join(unknown)}; valid: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kind = type(default)
            value = kind.from_mapping(value) if hasattr(kind, "from_mapping") else from_mapping(kind, value)
        kwargs[name] = value
    return cls(**kwargs)
