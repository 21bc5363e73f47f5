"""The Containerfile installs what the package declares: the Makefile's torch pin (CPU build by default),
the package itself with pip and its validator extra, in a builder stage whose environment alone goes into
the final image, a non-root user, an entry point that is one of the package's scripts, and labels that
agree with the package. (tests/test_container_image.py builds and runs the image.)"""

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


#: The step that installs the package from the copied sources, with the BIDS validator extra.
PACKAGE_INSTALL = re.compile(r"""pip install ["']?\.(\[validate\])?["']?(\s|$)""")


def _args(instructions) -> dict[str, str]:
    return dict(arg.split("=", 1) for word, arg in instructions if word == "ARG" and "=" in arg)


def _stages(instructions) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (from its FROM to the next)."""
    stages = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    return stages


def _labels(instructions) -> dict[str, str]:
    labels = {}
    for word, rest in instructions:
        if word == "LABEL":
            for key, value in re.findall(r'(\S+?)="([^"]*)"', rest):
                labels[key] = value
    return labels


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
    package_step = _index(instructions, lambda w, r: w == "RUN" and PACKAGE_INSTALL.search(r))
    assert torch_step < package_step


def test_base_image_is_a_slim_python_that_the_package_supports(instructions, pyproject):
    base = _args(instructions)["BASE_IMAGE"]
    assert re.search(r"python:\d+\.\d+-slim", base)
    # both stages on the same base: the environment copied from the builder needs the same Python
    assert [r.split()[0] for w, r in instructions if w == "FROM"] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    version = tuple(int(x) for x in re.search(r"python:(\d+)\.(\d+)", base).groups())
    requires = pyproject["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    assert version >= minimum


def _from_context(word: str, rest: str) -> bool:
    """A COPY of files of the build context (not from another stage)."""
    return word == "COPY" and not rest.startswith("--from=")


def test_the_package_is_installed_with_pip_from_everything_its_build_needs(instructions, pyproject):
    copied = set()
    for word, rest in instructions:
        if _from_context(word, rest):
            copied.update(rest.split()[:-1])
    package_step = _index(instructions, lambda w, r: w == "RUN" and PACKAGE_INSTALL.search(r))
    last_copy = max(i for i, (w, r) in enumerate(instructions) if _from_context(w, r))
    assert last_copy < package_step
    assert "pyproject.toml" in copied
    assert pyproject["project"]["readme"] in copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied  # the package folder, with its package data (templates)


def test_the_build_context_holds_what_is_copied_and_little_else(instructions):
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything is left out ...
    copied = {src for w, r in instructions if _from_context(w, r) for src in r.split()[:-1]}
    assert {f"!{src.rstrip('/')}" for src in copied} <= set(ignore)  # ... but what the Containerfile copies


def test_the_package_comes_with_the_bids_validator(instructions, pyproject):
    install = next(r for w, r in instructions if w == "RUN" and PACKAGE_INSTALL.search(r))
    from normdiff_bids.data.validation import VALIDATOR

    assert PACKAGE_INSTALL.search(install).group(1) == "[validate]"
    extra = pyproject["project"]["optional-dependencies"]["validate"]
    assert any(dep.startswith(VALIDATOR) for dep in extra)
    assert f"{VALIDATOR} --version" in install  # the build fails if the validator does not run


def test_the_final_stage_gets_the_builders_environment_only(instructions):
    builder, final = _stages(instructions)
    name = builder[0][1].split()[-1]
    assert builder[0][1].split()[1:] == ["AS", name]
    copies = [r for w, r in final if w == "COPY"]
    assert copies and all(r.startswith(f"--from={name} ") for r in copies)
    (venv,) = {r.split()[-1] for r in copies}
    assert f"python3 -m venv {venv}" in " ".join(r for w, r in builder if w == "RUN")
    assert f"PATH={venv}/bin:" in " ".join(r for w, r in final if w == "ENV")
    assert not any("pip install" in r or "apt-get" in r for w, r in final if w == "RUN")
    assert "PIP_NO_CACHE_DIR=1" in " ".join(r for w, r in builder if w == "ENV")


def test_labels_agree_with_the_package(instructions, pyproject):
    from normdiff_bids import __version__

    labels = _labels(instructions)
    args = _args(instructions)
    oci = "org.opencontainers.image."
    assert labels[oci + "title"] == pyproject["project"]["name"]
    assert labels[oci + "version"] == "${VERSION}" and args["VERSION"] == __version__
    assert args["IMAGE_TAG"] == "normdiff-bids:${VERSION}"
    assert labels[oci + "licenses"] == pyproject["project"]["license"]
    citation = (ROOT / "CITATION.cff").read_text()
    source = re.search(r'^repository-code:\s*"?([^"\s]+)', citation, re.M).group(1)
    assert labels[oci + "source"] == source
    for key in ("description", "created", "revision"):
        assert oci + key in labels


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
