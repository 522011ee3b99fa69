"""constraints.txt is the tested set: it pins every declared dependency within pyproject's
bounds, and the suite runs on exactly those versions (CI installs with `-c constraints.txt`)."""

import os
import re
import tomllib
from importlib import metadata

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def pins():
    found = {}
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert match, f"constraints.txt line {number}: expected NAME==VERSION, got {line!r}"
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def declared():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["test"]
    return [Requirement(r) for r in listed]


def test_every_declared_dependency_is_pinned_within_its_bounds():
    pinned = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is declared in pyproject.toml but not pinned"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {requirement}"
        )


def test_the_suite_runs_on_the_pinned_versions():
    # A mismatch means this environment was not installed with `-c constraints.txt`, or an
    # upgrade was not recorded there: reinstall with it, or update the file once CI passes.
    pinned = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        installed = metadata.version(requirement.name).split("+", 1)[0]  # 2.13.0+cpu is 2.13.0
        assert installed == pinned[name], f"{name} {installed} installed, {pinned[name]} pinned"
