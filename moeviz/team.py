"""Team mode: the settings that make one moeviz server safe to share, read from the environment.

Off (the default) moeviz is a single-user app on 127.0.0.1: no sign-in, any model, any path.
On (`MOEVIZ_TEAM=1`, which `moeviz serve --team` sets) every page needs a sign-in, models come
only from an allowlist and server-side paths only from allowed folders. The README section
"Serving moeviz to a team" lists every variable. Torch-free and Streamlit-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TRUE = ("1", "true", "yes", "on")


class TeamSettingsError(ValueError):
    """A team-mode variable that cannot be read; the message names it and shows the form."""


class PathRefused(ValueError):
    """A server-side path outside the allowed folders; the message says which are allowed."""


@dataclass(frozen=True)
class TeamSettings:
    enabled: bool = False
    models: tuple[tuple[str, str], ...] = ()  # (name shown, local folder or hub id), in the given order
    data_dirs: tuple[Path, ...] = ()          # resolved: symlinks in the settings themselves are trusted
    access_token: str | None = field(default=None, repr=False)  # never printed
    max_upload_mb: int = 50
    max_tokens: int = 2048
    concurrency: int = 1  # forward passes at once on one model

    @property
    def model_sources(self) -> dict[str, str]:
        return dict(self.models)

    def problems(self) -> list[str]:
        """What stops team mode from being served safely (nothing when off)."""
        if not self.enabled:
            return []
        missing = []
        if not self.models:
            missing.append("MOEVIZ_MODELS names no model: give at least one, e.g. MOEVIZ_MODELS='small=/models/small'")
        return missing


def read_settings(environ: Mapping[str, str] = os.environ) -> TeamSettings:
    """The team settings in `environ`; raises TeamSettingsError on a value it cannot read."""
    if environ.get("MOEVIZ_TEAM", "").strip().lower() not in TRUE:
        return TeamSettings()
    return TeamSettings(
        enabled=True,
        models=parse_models(environ.get("MOEVIZ_MODELS", "")),
        data_dirs=parse_data_dirs(environ.get("MOEVIZ_DATA_DIRS", "")),
        access_token=environ.get("MOEVIZ_ACCESS_TOKEN") or None,
        max_upload_mb=_positive(environ, "MOEVIZ_MAX_UPLOAD_MB", 50),
        max_tokens=_positive(environ, "MOEVIZ_MAX_TOKENS", 2048),
        concurrency=_positive(environ, "MOEVIZ_CONCURRENCY", 1),
    )


def parse_models(text: str) -> tuple[tuple[str, str], ...]:
    """`{"name": "folder or hub id", ...}` (JSON) or `name=folder;name=hub/id`."""
    text = text.strip()
    if not text:
        return ()
    if text.startswith("{"):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as error:
            raise TeamSettingsError(f"MOEVIZ_MODELS is not valid JSON ({error.msg} at character {error.pos}); "
                                    'expected e.g. {"small": "/models/small"}') from None
        if not all(isinstance(v, str) for v in pairs.values()):
            raise TeamSettingsError("MOEVIZ_MODELS: every value must be a folder or hub id (a string)")
        items = list(pairs.items())
    else:
        items = []
        for entry in filter(None, (part.strip() for part in text.split(";"))):
            name, equals, source = entry.partition("=")
            if not equals or not name.strip() or not source.strip():
                raise TeamSettingsError(f"MOEVIZ_MODELS: {entry!r} is not name=folder-or-hub-id; "
                                        "expected e.g. small=/models/small;mixtral=mistralai/Mixtral-8x7B-v0.1")
            items.append((name.strip(), source.strip()))
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise TeamSettingsError(f"MOEVIZ_MODELS names a model twice: {', '.join(names)}")
    return tuple(items)


def parse_data_dirs(text: str) -> tuple[Path, ...]:
    """Folders separated by the OS path separator (`:` here), each existing; resolved."""
    dirs = []
    for entry in filter(None, (part.strip() for part in text.split(os.pathsep))):
        folder = Path(entry).expanduser()
        if not folder.is_absolute() or not folder.is_dir():
            raise TeamSettingsError(f"MOEVIZ_DATA_DIRS: {entry} is not an existing absolute folder")
        dirs.append(folder.resolve())
    return tuple(dirs)


def allowed_path(text: str, data_dirs: tuple[Path, ...]) -> Path:
    """The resolved path `text` names, if it lies in one of `data_dirs` after following every
    symlink; relative paths are taken from the first folder. Raises PathRefused otherwise:
    `..` parts, `~`, paths outside, and symlinks that lead outside."""
    if not data_dirs:
        raise PathRefused("This server allows no data folders (MOEVIZ_DATA_DIRS is empty): "
                          "ask whoever runs it to add the folder that holds your runs.")
    given = Path(text)
    allowed = ", ".join(str(d) for d in data_dirs)
    if ".." in given.parts or text.startswith("~"):
        raise PathRefused(f"{text}: paths with `..` or `~` are not allowed here; give a path inside {allowed}.")
    resolved = (given if given.is_absolute() else data_dirs[0] / given).resolve()
    if not any(resolved.is_relative_to(folder) for folder in data_dirs):
        raise PathRefused(f"{text} is outside the folders this server shares ({allowed}), or a link leads "
                          "out of them: give a path inside one of them.")
    return resolved


def allowed_tree(folder: Path, data_dirs: tuple[Path, ...]) -> Path:
    """`folder` (already allowed) if none of its entries (a run's manifest and parts are all
    at its top) resolves outside `data_dirs`."""
    for path in folder.iterdir() if folder.is_dir() else ():
        allowed_path(str(path), data_dirs)
    return folder


def server_folder(text: str, settings: TeamSettings) -> Path:
    """The folder a page may open for `text`: any folder in single-user mode; in team mode one
    inside the data folders with no entry linking out (else PathRefused)."""
    if not settings.enabled:
        return Path(text).expanduser()
    return allowed_tree(allowed_path(text, settings.data_dirs), settings.data_dirs)


def _positive(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise TeamSettingsError(f"{name} is {value!r}; expected a whole number of at least 1")
    return int(value)
