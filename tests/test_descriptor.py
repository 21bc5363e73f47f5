"""The Boutiques descriptor is valid, and describes exactly the command line the BIDS-App parses."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from normdiff_bids.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "descriptors" / "normdiff-bids.json"
#: Parser options with no place in a descriptor (they print and exit, or only change logging).
NOT_DESCRIBED = {"--help", "--version", "--verbose"}


def _bosh() -> str:
    exe = Path(sys.executable).with_name("bosh")
    found = str(exe) if exe.exists() else shutil.which("bosh")
    if not found:
        pytest.skip("bosh (boutiques) is not installed")
    return found


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


def _parser_options() -> dict[str, object]:
    """Long option string -> argparse action, for every option of the parser."""
    out = {}
    for action in build_parser()._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs:
            out[longs[0]] = action
    return out


def test_bosh_validate_accepts_the_descriptor():
    result = subprocess.run([_bosh(), "validate", str(DESCRIPTOR)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_descriptor_and_parser_have_the_same_options(descriptor):
    described = {i["command-line-flag"] for i in descriptor["inputs"] if "command-line-flag" in i}
    parsed = set(_parser_options()) - NOT_DESCRIBED
    assert described == parsed


def test_choices_and_version_match_the_parser(descriptor):
    from normdiff_bids import __version__

    options = _parser_options()
    for item in descriptor["inputs"]:
        flag = item.get("command-line-flag")
        if flag and "value-choices" in item:
            assert list(options[flag].choices) == item["value-choices"], flag
        if flag and item["type"] == "Flag":
            assert options[flag].nargs == 0, flag
    assert descriptor["tool-version"] == __version__
    levels = next(i for i in descriptor["inputs"] if i["id"] == "analysis_level")
    assert levels["value-choices"] == ["group", "participant"]


def test_a_simulated_invocation_parses_to_what_it_says(tmp_path, descriptor):
    invocation = {"bids_dir": "/data/bids", "output_dir": "/data/bids/derivatives/normdiff",
                  "analysis_level": ["group", "participant"], "participant_label": ["01", "02"],
                  "reference_query": "diagnosis == 'HC'", "backbone": "saint", "epochs": 5, "n_samples": 200,
                  "seed": 3, "device": "cpu", "quiet": True, "overwrite_model": True,
                  "covariate": ["tiv", "scanner:categorical"]}
    path = tmp_path / "invocation.json"
    path.write_text(json.dumps(invocation))
    result = subprocess.run([_bosh(), "exec", "simulate", "-i", str(path), str(DESCRIPTOR)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("normdiff-bids "))
    opts = build_parser().parse_args(shlex.split(line)[1:])
    assert str(opts.bids_dir) == "/data/bids"
    assert opts.analysis_level == ["group", "participant"]
    assert opts.participant_label == ["01", "02"]
    assert opts.reference_query == "diagnosis == 'HC'"
    assert (opts.backbone, opts.epochs, opts.n_samples, opts.seed, opts.device) == ("saint", 5, 200, 3, "cpu")
    assert opts.quiet and opts.overwrite_model
    assert opts.covariate == ["tiv", "scanner:categorical"]


def test_descriptor_backbone_choices_are_the_registry(descriptor):
    # the descriptor is a static file: this is what keeps it in step with the backbone registry
    from normdiff_bids.model.backbones import backbone_names

    item = next(i for i in descriptor["inputs"] if i["id"] == "backbone")
    assert item["value-choices"] == backbone_names()
