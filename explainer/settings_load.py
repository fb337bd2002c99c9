"""From the sources to one Settings: load_settings() and its one-line errors; config_changes()
says what differs between two stored settings dicts.

Sources, lowest to highest: field defaults, `--config explainer.toml`, environment
variables (secrets only: OPENAI_API_KEY, OPENAI_BASE_URL), flags the user typed
(`--set section.field=value` among them). A problem is one line naming the flag or setting
and what it takes, never pydantic's multi-line dump.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomllib is 3.11+; tomli is the same parser under its PyPI name
    import tomli as tomllib

from explainer.errors import ExplainerError
from explainer.settings import Settings, base_type


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_assignment(text: str) -> dict[str, Any]:
    """`train.lr=3e-4` -> {"train": {"lr": "3e-4"}}; pydantic coerces the string."""
    if "=" not in text:
        raise ExplainerError(f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. --set train.lr=3e-4")
    dotted, value = text.split("=", 1)
    keys = dotted.strip().split(".")
    out: dict[str, Any] = {}
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def _valid_keys(loc: tuple) -> list[str]:
    """Field names allowed where an unknown key was found, so the error can suggest them."""
    model: Any = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


_NUMERIC_ERRORS = {"int_parsing", "int_from_float", "int_type", "float_parsing", "float_type", "finite_number",
                   "greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def allowed_range(field: Any) -> str:
    """`an integer from 2 to 281,474,976,710,656`, `a finite number > 0 and <= 1`: what a numeric field takes."""
    kind = "an integer" if base_type(field.annotation) is int else "a finite number"
    bounds = {op: getattr(m, op) for m in field.metadata for op in ("gt", "ge", "lt", "le") if hasattr(m, op)}
    fmt = (lambda v: f"{v:,}") if kind == "an integer" else (lambda v: f"{v:g}")
    if "ge" in bounds and "le" in bounds and kind == "an integer":
        return f"{kind} from {fmt(bounds['ge'])} to {fmt(bounds['le'])}"
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    limits = [f"{ops[k]} {fmt(v)}" for k, v in bounds.items()]
    return kind + (" " + " and ".join(limits) if limits else "")


def _field(loc: tuple) -> Any:
    model: Any = Settings
    field = None
    for part in loc:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return None
        model = field.annotation
    return field


def one_line(err: ValidationError, flags: Optional[dict[str, str]] = None) -> str:
    """Each problem as `--flag VALUE (section.field): must be RANGE`, never pydantic's multi-line dump.

    `flags` maps section.field to the flag the command line gave it (they differ between verbs);
    a setting without one is named as `section.field=VALUE`, as --set and the config file write it.
    """
    parts = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        field = _field(loc)
        if e["type"] == "extra_forbidden":
            keys = _valid_keys(loc)
            parts.append(f"{where}: unknown setting" + (f" (valid here: {', '.join(keys)})" if keys else ""))
        elif e["type"] in _NUMERIC_ERRORS and field is not None and len(loc) == 2:
            value = e["input"] if isinstance(e["input"], str) else repr(e["input"])
            flag = (flags or {}).get(where)
            named = f"{flag} {value} ({where})" if flag else f"{where}={value}"
            parts.append(f"{named}: must be {allowed_range(field)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def load_settings(path: Optional[Path] = None, overrides: Optional[dict[str, Any]] = None,
                  flags: Optional[dict[str, str]] = None) -> Settings:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ExplainerError(f"config file {path} not found (pass an existing TOML file to --config)") from None
        except tomllib.TOMLDecodeError as e:
            raise ExplainerError(f"config file {path} is not valid TOML: {e}") from None
    env: dict[str, Any] = {}
    if os.environ.get("OPENAI_API_KEY"):
        env.setdefault("llm", {})["api_key"] = os.environ["OPENAI_API_KEY"]
    if os.environ.get("OPENAI_BASE_URL"):
        env.setdefault("llm", {})["base_url"] = os.environ["OPENAI_BASE_URL"]
    merged = deep_merge(deep_merge(data, env), overrides or {})
    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        src = f" (in {path} or flags)" if path else ""
        raise ExplainerError(f"invalid settings{src}: {one_line(e, flags)}") from None


def config_changes(old: Any, new: Any, prefix: str = "", limit: int = 6) -> list[str]:
    """`key: old -> new` for each leaf that differs between two config dicts (at most `limit`)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b, name = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{name}.", limit)
        elif a != b:
            out.append(f"{name}: {'(default)' if a is None else repr(a)} -> {'(default)' if b is None else repr(b)}")
    return out[:limit]
