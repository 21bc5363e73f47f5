"""The Containerfile installs what the package declares: the Makefile's torch pin (CPU build by default),
the package itself with pip, a non-root user, and an entry point that is one of the package's scripts."""

from __future__ import annotations

import re
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def containerfile() -> str:
    return (ROOT / "Containerfile").read_text()


@pytest.fixture(scope="module")
def instructions(containerfile) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", containerfile)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _args(instructions) -> dict[str, str]:
    return dict(arg.split("=", 1) for word, arg in instructions if word == "ARG" and "=" in arg)


def _index(instructions, predicate) -> int:
    for i, (word, rest) in enumerate(instructions):
        if predicate(word, rest):
            return i
    raise AssertionError("instruction not found")


def test_torch_pin_is_the_makefiles(instructions):
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert _args(instructions)["TORCH_SPEC"] == pin


def test_torch_defaults_to_the_cpu_build_and_comes_before_the_package(instructions):
    args = _args(instructions)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    torch_step = _index(instructions, lambda w, r: w == "RUN" and "${TORCH_SPEC}" in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in instructions[torch_step][1]
    package_step = _index(instructions, lambda w, r: w == "RUN" and re.search(r"pip install \.(\s|$)", r))
    assert torch_step < package_step


def test_base_image_is_a_slim_python_that_the_package_supports(instructions, pyproject):
    base = _args(instructions)["BASE_IMAGE"]
    assert re.search(r"python:\d+\.\d+-slim", base)
    assert instructions[_index(instructions, lambda w, r: w == "FROM")][1] == "${BASE_IMAGE}"
    version = tuple(int(x) for x in re.search(r"python:(\d+)\.(\d+)", base).groups())
    requires = pyproject["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    assert version >= minimum


def test_the_package_is_installed_with_pip_from_everything_its_build_needs(instructions, pyproject):
    copied = set()
    for word, rest in instructions:
        if word == "COPY":
            copied.update(rest.split()[:-1])
    package_step = _index(instructions, lambda w, r: w == "RUN" and re.search(r"pip install \.(\s|$)", r))
    last_copy = max(i for i, (w, _) in enumerate(instructions) if w == "COPY")
    assert last_copy < package_step
    assert "pyproject.toml" in copied
    assert pyproject["project"]["readme"] in copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied  # the package folder, with its package data (templates)


def test_runs_as_a_non_root_user_after_installing(instructions):
    users = [i for i, (w, _) in enumerate(instructions) if w == "USER"]
    assert users, "the image must switch to an unprivileged user"
    user = instructions[users[-1]][1]
    assert user not in ("root", "0") and not user.startswith("0:")
    last_run = max(i for i, (w, r) in enumerate(instructions) if w == "RUN" and "pip install" in r)
    assert users[-1] > last_run


def test_entrypoint_is_a_console_script_of_the_package(instructions, pyproject):
    entry = [r for w, r in instructions if w == "ENTRYPOINT"]
    assert entry == ['["normdiff-bids"]']
    target = pyproject["project"]["scripts"]["normdiff-bids"]
    module, _, function = target.partition(":")
    assert callable(getattr(import_module(module), function))


def test_container_records_itself_in_the_outputs(instructions):
    from normdiff_bids.outputs.dataset import generated_by

    env = " ".join(r for w, r in instructions if w == "ENV")
    assert "NORMDIFF_CONTAINER_TYPE=docker" in env
    assert "NIPYPE_NO_ET=1" in env
    entry = generated_by({"NORMDIFF_CONTAINER_TYPE": "docker",
                          "NORMDIFF_CONTAINER_TAG": "normdiff-bids:0.1.0"})
    assert entry["Container"] == {"Type": "docker", "Tag": "normdiff-bids:0.1.0"}
