"""The configs shipped with mlcil, by short name: ``mlcil train --config digits-pretrained-b0-c2``.

The repository's ``configs/`` folder is installed with the package as ``mlcil/configs`` (see
``[tool.setuptools]`` in pyproject.toml), so the same names work from a wheel, from an editable
install and from a source checkout, where the folder is read in place.

A config's short name is its path under ``configs/`` without ``.yaml``, with ``/`` and ``_``
written as ``-``: ``configs/digits_pretrained/krt.yaml`` is ``digits-pretrained-krt``. A name
given by the user is normalised the same way, so ``digits_pretrained/krt`` finds it too. A file
path always wins: a file or folder that exists under the given name is read as given.

Groups of shipped configs are named by patterns (:func:`matching_configs`): ``*``, ``?`` and
``[...]`` match short names (``digits-pretrained-*``) or paths under ``configs/``
(``digits_pretrained/*``, also ``configs/digits_pretrained/*.yaml`` as a shell passes it on when
no such folder is there). A *fragment* is a partial config meant to be stacked on a runnable
one (``configs/methods/*.yaml``: a method and its network, no data, no protocol).
"""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path, PurePosixPath

import yaml

from mlcil.errors import ConfigError

SUFFIX = ".yaml"


def packaged_root() -> Path | None:
    """The folder of the shipped configs: ``mlcil/configs`` inside an installed wheel, else the
    ``configs/`` folder of the source checkout this module runs from; None when neither exists
    (a wheel built without them)."""
    package = Path(__file__).resolve().parent.parent  # .../mlcil
    installed = package / "configs"
    if installed.is_dir():
        return installed
    checkout = package.parent.parent  # src/mlcil -> the repository
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def short_name(text: str | PurePosixPath) -> str:
    """The short name of a path under ``configs/`` (or of a name as a user wrote it)."""
    name = str(text).replace("\\", "/").strip()
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    return name.strip("/").replace("/", "-").replace("_", "-").lower()


def packaged_configs() -> dict[str, Path]:
    """Every shipped config: short name -> file, sorted by name.

    Raises:
        ConfigError: when two files share a short name (``a_b.yaml`` and ``a/b.yaml``), naming
            both, so a name never picks one of them silently.
    """
    root = packaged_root()
    if root is None:
        return {}
    found: dict[str, Path] = {}
    for path in sorted(root.rglob(f"*{SUFFIX}")):
        relative = PurePosixPath(path.relative_to(root).as_posix())
        name = short_name(relative)
        if name in found:
            raise ConfigError(
                f"packaged configs {found[name]} and {path} share the short name {name!r}: "
                "rename one of them"
            )
        found[name] = path
    return dict(sorted(found.items()))


def find_packaged(name: str | Path) -> Path | None:
    """The shipped config called ``name`` (normalised as :func:`short_name`), or None.

    A leading ``configs/`` is dropped too, so the README's ``--config configs/x.yaml`` also
    works outside the repository.
    """
    configs = packaged_configs()
    wanted = short_name(str(name))
    return configs.get(wanted) or configs.get(wanted.removeprefix("configs-"))


def resolve_config(spec: str | Path) -> Path:
    """The file a ``--config`` value names: an existing path as given, else a shipped config.

    Raises:
        ConfigError: naming ``spec`` when it is neither a path that exists nor a shipped name,
            with the closest shipped names.
    """
    path = Path(spec)
    if path.exists():
        return path
    packaged = find_packaged(spec)
    if packaged is not None:
        return packaged
    names = list(packaged_configs())
    close = difflib.get_close_matches(short_name(str(spec)), names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"config file not found: {spec} (no such file, nor a packaged config of that name: "
        f"`mlcil configs` lists them){hint}"
    )


def summary(path: Path) -> str:
    """The description of a config file: its leading comment block, whole, as one paragraph
    (what ``mlcil configs`` shows)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    words: list[str] = []
    for line in lines:
        text = line.strip()
        if not text and not words:
            continue  # blank lines before the description
        if not text.startswith("#") or not text.lstrip("#").strip():
            break  # settings, a blank line or an empty comment line end the description
        words.extend(text.lstrip("#").split())
    return " ".join(words)


GLOB_CHARACTERS = frozenset("*?[")


def is_pattern(text: str) -> bool:
    """Whether ``text`` holds a glob character (``*``, ``?``, ``[``)."""
    return any(character in GLOB_CHARACTERS for character in text)


def _spellings(name: str, path: Path, root: Path) -> list[str]:
    relative = path.relative_to(root).as_posix()
    return [name, relative, relative.removesuffix(SUFFIX)]


def matching_configs(pattern: str | None = None) -> dict[str, Path]:
    """The shipped configs a pattern names: with ``*``, ``?`` or ``[`` a glob over short names
    and over paths under ``configs/``; otherwise every config whose short name contains it; all
    of them for None."""
    configs = packaged_configs()
    root = packaged_root()
    if pattern is None or root is None:
        return configs
    if not is_pattern(pattern):
        wanted = short_name(pattern)
        return {name: path for name, path in configs.items() if wanted in name}
    text = pattern.replace("\\", "/").strip()
    text = text.removeprefix("./").removeprefix("configs/")
    globs = {text, text.lower(), short_name(text) if "/" not in text else text}
    return {
        name: path
        for name, path in configs.items()
        if any(
            fnmatch.fnmatchcase(spelled, glob)
            for spelled in _spellings(name, path, root)
            for glob in globs
        )
    }


def _top_level(path: Path, seen: frozenset[Path] = frozenset()) -> set[str]:
    """The top-level keys a config sets, through its includes (read leniently: for listing)."""
    if path in seen:
        return set()
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    if not isinstance(content, dict):
        return set()
    keys = set(content)
    includes = content.get("include") or []
    for include in [includes] if isinstance(includes, str) else includes:
        if isinstance(include, str):
            target = path.parent / include
            found = target if target.is_file() else find_packaged(include)
            if found is not None:
                keys |= _top_level(found, seen | {path})
    return keys


def is_fragment(path: Path) -> bool:
    """Whether a config is partial, to be stacked on a runnable one: neither it nor what it
    includes sets ``data`` or ``protocol`` (``configs/methods/*.yaml``)."""
    return not ({"data", "protocol"} & _top_level(path))


def expand_config_pattern(spec: str) -> list[str]:
    """The runnable shipped configs (fragments left out) a pattern names, as files; a spec that
    is no pattern, or a file that exists, is returned as it is.

    Raises:
        ConfigError: a pattern that names no runnable shipped config.
    """
    if not is_pattern(spec) or Path(spec).exists():
        return [spec]
    found = [str(path) for path in matching_configs(spec).values() if not is_fragment(path)]
    if not found:
        raise ConfigError(
            f"{spec}: no file, and no runnable shipped config matches this pattern "
            "(`mlcil configs PATTERN` lists what a pattern matches)"
        )
    return found
