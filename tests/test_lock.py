"""The lock (requirements/cpu.lock) against pyproject.toml and against the installed environment.

Offline: it reads files and installed metadata only, so a stale lock or a drifted venv fails here rather
than as a changed default deep inside training.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements", "cpu.lock")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def read_lock(path: str = LOCK) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = PIN.match(line)
            assert match, f"{path}:{number}: not an exact pin: {raw.strip()!r}"
            name = canonicalize_name(match.group(1))
            assert name not in pins, f"{path}:{number}: {name} is pinned twice"
            pins[name] = Version(match.group(2))
    return pins


def project_requirements() -> list[Requirement]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    project = pyproject["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    names += pyproject["build-system"]["requires"]
    return [Requirement(r) for r in names]


def test_every_requirement_is_pinned_within_its_range():
    pins = read_lock()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml requires {req} but {LOCK} does not pin it (run `make lock`)"
        # A local label (+cpu) does not change the release the range is about.
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK} pins {name}=={pins[name]}, outside pyproject.toml's {req} (run `make lock`)"
        )


def test_torch_is_the_cpu_build_and_transformers_the_tested_release():
    pins = read_lock()
    assert pins["torch"].local == "cpu", "the lock is for CPU machines: torch must be the +cpu build"
    with open(os.path.join(ROOT, "requirements", "pins.txt")) as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        deliberate = [Requirement(line) for line in lines if line]
    for req in deliberate:
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), req


def test_the_environment_is_the_lock():
    """`make setup` installed exactly the lock (torch may be the CUDA build of the same release)."""
    drift = []
    for name, version in read_lock().items():
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            drift.append(f"{name}: not installed (locked {version})")
            continue
        if name == "torch" and installed.local != version.local and installed.public == version.public:
            continue
        if installed != version:
            drift.append(f"{name}: installed {installed}, locked {version}")
    assert not drift, "the venv differs from the lock (make setup reinstalls it):\n  " + "\n  ".join(drift)


@pytest.mark.parametrize("bad", ["torch>=2", "numpy==1.0\nnumpy==1.0"])
def test_a_loose_or_doubled_pin_is_refused(tmp_path, bad):
    path = tmp_path / "x.lock"
    path.write_text(bad + "\n")
    with pytest.raises(AssertionError):
        read_lock(str(path))
