"""What a user installs: the sdist and the wheel built from this checkout carry the license, the
``py.typed`` marker and the built-in configs.

The build (``python -m build``: the sdist, then the wheel from the unpacked sdist, so nothing in
the checkout's ``build/`` can leak in; ``--no-isolation``: this environment's setuptools, from the
``test`` extra) takes a few seconds. ``make wheel-check`` goes further:
it installs the wheel into a fresh virtual environment and runs ``zshard demo`` and
``zshard train tiny`` there.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from zshard import __version__, configs

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = out.glob("zshard-*.whl")
    (sdist,) = out.glob("zshard-*.tar.gz")
    return wheel, sdist


def test_wheel_has_license_py_typed_and_configs(dists: tuple[Path, Path]) -> None:
    wheel, _ = dists
    info = f"zshard-{__version__}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
        metadata = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        packaged_tiny = z.read("zshard/configs/tiny.yaml")
    assert "zshard/py.typed" in names
    assert "zshard/configs/__init__.py" in names
    for name in configs.names():
        assert f"zshard/configs/{name}.yaml" in names
    assert "zshard/train/data/corpus/shakespeare.txt" in names  # the built-in data set
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert (REPO / "LICENSE").read_text() == license_text
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert packaged_tiny == (REPO / "zshard" / "configs" / "tiny.yaml").read_bytes()
    assert not any(n.startswith(("tests/", "examples/")) for n in names)


def test_sdist_has_license_and_package_data(dists: tuple[Path, Path]) -> None:
    _, sdist = dists
    top = f"zshard-{__version__}"
    with tarfile.open(sdist) as t:
        names = set(t.getnames())
    for path in ("LICENSE", "zshard/py.typed", "zshard/configs/tiny.yaml", "pyproject.toml"):
        assert f"{top}/{path}" in names
