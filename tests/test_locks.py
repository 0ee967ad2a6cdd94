"""The locks that deploy/bootstrap.sh installs agree with pyproject.toml and with each other
(deploy/lock writes both; a hand edit or a forgotten relock shows here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(lock: str) -> dict[str, Version]:
    text = (ROOT / lock).read_text()
    found: dict[str, Version] = {
        canonicalize_name(m.group(1)): Version(m.group(2))
        for m in (PIN.match(line) for line in text.splitlines())
        if m is not None
    }
    assert found, f"no pins in {lock}"
    return found


def requirements(extra: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    if extra:
        listed += project["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


@pytest.mark.parametrize(
    ("lock", "extra"), [("requirements.lock", ""), ("requirements-test.lock", "test")]
)
def test_a_lock_pins_every_requirement_at_an_allowed_version(lock: str, extra: str) -> None:
    locked = pins(lock)
    for req in requirements(extra):
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is not in {lock}: run deploy/lock"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{lock} pins {name}=={locked[name]}, outside {req}: run deploy/lock"
        )


def test_every_pin_of_the_runtime_lock_is_the_one_the_tests_run_with() -> None:
    runtime, test = pins("requirements.lock"), pins("requirements-test.lock")
    differ = {n: (v, test.get(n)) for n, v in runtime.items() if test.get(n) != v}
    assert not differ, f"requirements.lock and requirements-test.lock disagree: {differ}"


def test_every_pin_carries_its_hashes() -> None:
    for lock in ("requirements.lock", "requirements-test.lock"):
        entries = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / lock).read_text())
        unhashed = [e.split()[0] for e in entries if PIN.match(e) and "--hash=sha256:" not in e]
        assert not unhashed, f"{lock}: pins without hashes: {unhashed}"


@pytest.mark.parametrize("library", ["python-engineio", "python-socketio"])
def test_the_libraries_membrane_overrides_are_held_to_one_minor_version(library: str) -> None:
    """Their private methods are replaced (tests/test_upstream_guard.py): a new minor version
    must be a decision, never what a fresh install happens to pick."""
    (req,) = [r for r in requirements("") if canonicalize_name(r.name) == library]
    lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
    upper = [Version(s.version) for s in req.specifier if s.operator == "<"]
    assert len(lower) == 1 and len(upper) == 1, f"{req}: want >=X.Y.Z,<X.(Y+1)"
    assert (upper[0].major, upper[0].minor) == (lower[0].major, lower[0].minor + 1), str(req)
