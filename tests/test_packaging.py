"""One distribution, one import root: stream/, sinks/ and bulk/ install as
embedstream.stream, embedstream.sinks and embedstream.bulk, and nothing else lands
at the top level, in the editable install and in a wheel alike.

Each check runs a fresh interpreter from a directory outside the checkout, as a user
would, so pytest's own sys.path (which holds the repository root) cannot hide a
missing or leaking name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: prints where each package was found, then checks that
# the folder names are not importable on their own.
_PROBE = """
import importlib, json, sys
found = {}
for name in ("embedstream.stream", "embedstream.sinks", "embedstream.bulk",
             "embedstream.stream.app.cli"):
    found[name] = importlib.import_module(name).__file__
missing = []
for name in ("stream", "sinks", "bulk"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing.append(str(error))
print(json.dumps({"found": found, "missing": missing}))
"""


def _probe(python: str, cwd: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([python, "-c", _PROBE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_editable_install_has_one_import_root(tmp_path: Path) -> None:
    result = _probe(sys.executable, tmp_path)
    found = result["found"]
    assert isinstance(found, dict)
    assert found["embedstream.stream"] == str(ROOT / "stream" / "__init__.py")
    assert found["embedstream.sinks"] == str(ROOT / "sinks" / "__init__.py")
    assert found["embedstream.bulk"] == str(ROOT / "bulk" / "__init__.py")
    assert result["missing"] == ["No module named 'stream'", "No module named 'sinks'",
                                 "No module named 'bulk'"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_wheel_installs_embedstream_and_nothing_else(tmp_path: Path) -> None:
    # Built from the files the Dockerfile copies, in a scratch folder: the wheel needs
    # nothing else, and pip leaves its build/ folder there, not in the checkout.
    source = tmp_path / "source"
    for name in ("stream", "sinks", "bulk"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("embedstream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {
        "embedstream", "embedstream-0.1.0.dist-info"}
    assert "embedstream/__init__.py" not in names  # a namespace: no one owns the root
    for package in ("stream", "sinks", "bulk"):
        assert f"embedstream/{package}/py.typed" in names
    assert "embedstream/stream/app/cli.py" in names
    assert not [n for n in names if "/tests/" in n or "/bench/" in n]

    # A throwaway venv with the wheel alone; the project's dependencies are reached
    # through a plain path entry to this venv's site-packages (not a site dir, so its
    # editable-install hook is not loaded and cannot shadow the wheel).
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install",
         "--no-deps", "--quiet", str(wheel)], capture_output=True, text=True, timeout=240)
    assert installed.returncode == 0, installed.stderr
    [site] = target.glob("lib/python*/site-packages")
    [ours] = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()
              and Path(p).resolve().is_relative_to(Path(sys.prefix).resolve())]
    (site / "dependencies.pth").write_text(ours + "\n")

    result = _probe(str(target / "bin" / "python"), tmp_path)
    found = result["found"]
    assert isinstance(found, dict)
    for name, path in found.items():
        assert Path(str(path)).is_relative_to(site), (name, path)
    assert len(result["missing"]) == 3  # type: ignore[arg-type]

    # The console script and the package's own data (the plan's built-in sample).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    helped = subprocess.run([str(target / "bin" / "embedstream"), "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "rebuild" in helped.stdout, helped.stderr
    sample = subprocess.run(
        [str(target / "bin" / "python"), "-c",
         "from embedstream.bulk.sizing import builtin_sample; print(len(builtin_sample(50)))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert sample.stdout.strip() == "50", sample.stderr
