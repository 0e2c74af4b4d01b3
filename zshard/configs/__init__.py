"""Built-in training configurations, shipped inside the package as ``zshard/configs/*.yaml``.

``zshard train tiny`` runs ``tiny.yaml`` from here wherever zshard is installed (a checkout also
has the same file as ``examples/tiny.yaml``). :func:`resolve` turns the CONFIG argument of
``zshard train`` and ``zshard estimate`` into a file path; :func:`write_starter` is ``zshard init``.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from importlib import resources
from pathlib import Path

from zshard.errors import ConfigError, OutputExistsError

SUFFIX = ".yaml"
DEFAULT = "tiny"


def names() -> list[str]:
    """The built-in config names, sorted: this package's ``*.yaml`` files without the suffix."""
    return sorted(
        entry.name[: -len(SUFFIX)]
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(SUFFIX) and entry.is_file()
    )


def _bare_name(arg: str) -> str | None:
    """``tiny`` or ``tiny.yaml`` -> ``tiny``; an argument with a directory part -> None."""
    if not arg or any(sep and sep in arg for sep in ("/", os.sep, os.altsep)):
        return None
    for suffix in (".yaml", ".yml"):
        if arg.endswith(suffix):
            return arg[: -len(suffix)] or None
    return arg


def _path_of(name: str) -> str:
    """A real file path for the built-in ``name``, usable by other processes."""
    entry = resources.files(__name__) / (name + SUFFIX)
    if isinstance(entry, Path):  # installed as files (wheel, editable, checkout): the usual case
        return os.path.abspath(entry)
    # Imported from a zip: a copy that outlives this call, since worker processes open it later.
    with resources.as_file(entry) as path:
        copy = Path(tempfile.mkdtemp(prefix="zshard-config-")) / path.name
        copy.write_bytes(path.read_bytes())
    return str(copy)


def _unknown(arg: str, what: str) -> ConfigError:
    return ConfigError(f"{what} {arg!r}; built-in configs: {', '.join(names())}")


def builtin(name: str) -> str:
    """The file path of the built-in config ``name`` (``tiny`` or ``tiny.yaml``).

    Raises:
        ConfigError: no built-in config has that name (the message lists the names).
    """
    bare = _bare_name(name)
    if bare is None or bare not in names():
        raise _unknown(name, "no built-in config")
    return _path_of(bare)


def resolve(name_or_path: str) -> str:
    """A ``zshard train`` CONFIG argument -> the YAML file to load.

    An existing file is returned as given. Otherwise a bare name (no directory part; the
    ``.yaml`` suffix is optional) names a built-in config, returned as an absolute path inside the
    installed package, so relative paths in it (a ``deepspeed:`` file) resolve next to it.

    Raises:
        ConfigError: neither an existing file nor a built-in name (the message lists the names).
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    bare = _bare_name(name_or_path)
    if bare is not None and bare in names():
        return _path_of(bare)
    raise _unknown(name_or_path, "config file does not exist and is no built-in config:")


def looks_like_path(arg: str) -> bool:
    """True for a YAML file name or a path (``my.yaml``, ``runs/a``) rather than a config name."""
    return _bare_name(arg) != arg


def write_starter(name: str, out: str | None = None, *, overwrite: bool = False) -> str:
    """Write the built-in config ``name`` to ``out`` with a header comment; return the path.

    ``out`` defaults to ``NAME.yaml`` in the working directory; an existing directory gets
    ``NAME.yaml`` inside it. Missing parent directories are created.

    Raises:
        ConfigError: ``name`` is not a built-in config.
        OutputExistsError: the file exists and ``overwrite`` is false (nothing is written).
    """
    from zshard import __version__

    source = builtin(name)
    bare = Path(source).stem
    target = out if out is not None else bare + SUFFIX
    if os.path.isdir(target):
        target = os.path.join(target, bare + SUFFIX)
    if os.path.exists(target) and not overwrite:
        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
    header = (
        f"# Written by `zshard init {bare}` (zshard {__version__}) from the built-in config "
        f"{bare!r}.\n"
        f"# Edit it, then run:  zshard train {shlex.quote(target)}\n"
        "# Any key can also be overridden per run: --set train.steps=100 --set zero.stage=3\n"
        "#\n"
    )
    body = Path(source).read_text(encoding="utf-8")
    parent = os.path.dirname(target)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        with open(target, "w" if overwrite else "x", encoding="utf-8") as f:
            f.write(header + body)
    except FileExistsError:  # created since the check above
        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it") from None
    return target
