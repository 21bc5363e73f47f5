"""The citation metadata agrees with the package: CITATION.cff is CFF 1.2.0 for this version and cites the
references the run's methods text cites; the changelog has this version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from normdiff_bids import __version__
from normdiff_bids.outputs.runlog import REFERENCES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cff() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def test_citation_cff_describes_this_version(cff):
    assert cff["cff-version"] == "1.2.0"
    assert cff["type"] == "software" and cff["version"] == __version__
    assert cff["license"] == "Apache-2.0"
    assert {"authors", "title", "message"} <= set(cff)


def test_citation_cff_and_the_methods_text_cite_the_same_works(cff):
    in_cff = {ref.get("doi") for ref in cff["references"]}
    in_bib = {m for entry in REFERENCES.values() for m in re.findall(r"doi = \{([^}]+)\}", entry)}
    assert in_cff - {None} == in_bib
    method = cff["references"][0]
    assert method["doi"] == "10.48550/arXiv.2602.04886"
    assert [a["family-names"] for a in method["authors"]] == ["Whitbread", "Palmer", "Jenkinson"]


def test_the_changelog_has_this_version_and_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings[0] == "Unreleased" and __version__ in headings
