"""The configs shipped with mlcil, by short name: ``mlcil train --config digits-pretrained-b0-c2``.

The repository's ``configs/`` folder is installed with the package as ``mlcil/configs`` (see
``[tool.setuptools]`` in pyproject.toml), so the same names work from a wheel, from an editable
install and from a source checkout, where the folder is read in place.

A config's short name is its path under ``configs/`` without ``.yaml``, with ``/`` and ``_``
written as ``-``: ``configs/digits_pretrained/krt.yaml`` is ``digits-pretrained-krt``. A name
given by the user is normalised the same way, so ``digits_pretrained/krt`` finds it too. A file
path always wins: a file or folder that exists under the given name is read as given.
"""

from __future__ import annotations

import difflib
from pathlib import Path, PurePosixPath

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
    """The first comment line of a config file (what ``mlcil configs`` shows)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            return ""  # settings before any comment: the file has no description
    return ""
