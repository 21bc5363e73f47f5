"""The container image, built and run: ``--version``, its labels and user, then ``normdiff-synth`` writes a
small synthetic dataset and ``group participant`` runs on it offline, as the image's unprivileged user,
with the BIDS validator the image ships.

The image is ``$NORMDIFF_CONTAINER_IMAGE`` when set (``.ci/container.sh`` builds it and says so; then any
failure fails); otherwise one is built here with ``workflows/build_container.sh`` (seconds when its layers
are cached) if Podman is installed, a base image is present and Podman can run it; the tests skip if not.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from product_helpers import N_SUBJECTS, SEED, TINY_ARGS

from normdiff_bids import __version__

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ENV = "NORMDIFF_CONTAINER_IMAGE"
#: What workflows/build_container.sh names the Debian stand-in for the base image when none can be pulled.
STANDIN_BASE = os.environ.get("NORMDIFF_STANDIN_BASE", "localhost/normdiff-base:bookworm-python3.11")
TEST_TAG = "normdiff-bids:test"
#: Offline (a BIDS-App must not need the network) and with no SELinux relabelling of the bound folders.
RUN = ["run", "--rm", "--network", "none", "--security-opt", "label=disable"]

pytestmark = pytest.mark.slow


def _podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _base_images() -> list[str]:
    default = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Containerfile").read_text(), re.M).group(1)
    return [default, STANDIN_BASE]


@pytest.fixture(scope="module")
def image() -> str:
    given = os.environ.get(IMAGE_ENV)
    if given:
        return given
    if shutil.which("podman") is None:
        pytest.skip(f"podman is not installed (and {IMAGE_ENV} names no image)")
    base = next((b for b in _base_images() if _podman("image", "exists", b).returncode == 0), None)
    if base is None:
        pytest.skip(f"no base image ({' nor '.join(_base_images())}); `.ci/container.sh` or "
                    "`workflows/build_container.sh` makes one")
    probe = _podman(*RUN, "--entrypoint", "true", base, timeout=60)
    if probe.returncode:
        pytest.skip(f"podman cannot run a container here ({_last_line(probe)}); see .ci/container.sh")
    env = {**os.environ, "NORMDIFF_BASE_IMAGE": base}
    build = subprocess.run([str(ROOT / "workflows" / "build_container.sh"), "--tag", TEST_TAG],
                           capture_output=True, text=True, timeout=900, env=env)
    assert build.returncode == 0, f"the image did not build:\n{build.stderr[-3000:]}"
    return build.stdout.strip().splitlines()[-1]


def _inspect(image: str) -> dict:
    proc = _podman("image", "inspect", image, timeout=60)
    assert proc.returncode == 0, _last_line(proc)
    return json.loads(proc.stdout)[0]


def _open_folder(path: Path) -> Path:
    """A folder the image's user (another uid) may write into."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def test_says_its_version(image):
    proc = _podman(*RUN, image, "--version", timeout=120)
    assert proc.returncode == 0, _last_line(proc)
    assert proc.stdout.strip() == f"normdiff-bids {__version__}"


def test_labels_and_user(image):
    config = _inspect(image)["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "normdiff-bids"
    assert config["User"] not in ("", "root", "0")
    proc = _podman(*RUN, "--entrypoint", "sh", image, "-c",
                   "id -u; for c in cc gcc bids-validator-deno; do command -v $c; done; true", timeout=120)
    uid, *found = proc.stdout.split()
    assert uid != "0"
    assert [Path(p).name for p in found] == ["bids-validator-deno"]  # the validator, and no compiler


def test_group_and_participant_on_a_synthetic_dataset(image, tmp_path):
    work = _open_folder(tmp_path / "work")
    out = _open_folder(tmp_path / "out")
    synth = _podman(*RUN, "-v", f"{work}:/work", "--entrypoint", "normdiff-synth", image,
                    "/work/bids", "--n-subjects", str(N_SUBJECTS), "--seed", str(SEED), "--patients", "0.2",
                    timeout=120)
    assert synth.returncode == 0, _last_line(synth)

    args = [a for a in TINY_ARGS if a != "--skip-bids-validation"]  # the image's validator checks the input
    run = _podman(*RUN, "-v", f"{work / 'bids'}:/data:ro", "-v", f"{out}:/out", image,
                  "/data", "/out", "group", "participant", *args, "--reference-query", "diagnosis == 'HC'",
                  "--work-dir", "/tmp/work", timeout=480)
    assert run.returncode == 0, f"the app failed in the container:\n{(run.stdout + run.stderr)[-3000:]}"

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Version"] == __version__
    container = description["GeneratedBy"][0]["Container"]
    assert container["Type"] == "docker"
    # the tag it was built with (Podman lists it as localhost/NAME:TAG)
    assert any(t.split("/")[-1] == container["Tag"] for t in _inspect(image)["RepoTags"]), container
    group = out / "phenotype" / "normdiff_deviations.tsv"
    assert len(group.read_text().splitlines()) == N_SUBJECTS + 1
    scores = sorted(out.glob("sub-*/anat/sub-*_desc-deviations_scores.tsv"))
    assert len(scores) == N_SUBJECTS
    assert (out / "group.html").is_file() and len(list(out.glob("sub-*.html"))) == N_SUBJECTS
    assert group.stat().st_uid != 0 and scores[0].stat().st_uid != 0  # written by the unprivileged user
    (record,) = [json.loads(Path(p).read_text()) for p in glob.glob(str(out / "logs" / "run-*.json"))]
    assert record["status"] == "success"
    assert record["resolved"]["bids_validation"]["validator"].startswith("bids-validator-deno ")
