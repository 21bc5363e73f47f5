"""The derivatives dataset as a whole: checking the output folder, ``dataset_description.json``,
``descriptions.tsv``, ``.bidsignore`` and the README.

Files shared between jobs (``dataset_description.json``, ``.bidsignore``, group tables) are only
changed as read-merge-write under :func:`~normdiff_bids.outputs.lock.output_lock`, and always replaced
atomically, so two participant-level jobs writing into one folder at once both succeed and nothing is
lost. The lock (``outputs/lock.py``) and the model cards (``outputs/model_card.py``) are re-exported here
for the old import path.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_write_text
from normdiff_bids.bidsio import write_json
from normdiff_bids.errors import OutputError
from normdiff_bids.outputs import names
from normdiff_bids.outputs.lock import LOCK_NAME, LOCK_TIMEOUT_S, output_lock
from normdiff_bids.outputs.model_card import write_model_card

__all__ = ["BIDSIGNORE_PATTERNS", "BIDS_VERSION", "LOCK_NAME", "LOCK_TIMEOUT_S", "PIPELINE_NAME", "bids_uri",
           "check_output_dir", "dataset_description", "generated_by", "output_lock", "prepare_output_dir",
           "write_model_card"]

PIPELINE_NAME = "normdiff-bids"
#: BIDS version the derivatives follow.
BIDS_VERSION = "1.10.0"

#: Files BIDS has no name for, declared so the validator does not flag them. Everything else
#: (dataset_description.json, README.md, phenotype/ tables) is plain BIDS.
BIDSIGNORE_PATTERNS: tuple[str, ...] = (
    "*.html",                        # subject and group reports (sub-<label>[_ses-<label>].html, group.html)
    "models",                        # trained model bundles and model cards
    "sub-*/**/*_desc-deviations_scores.tsv",
    "sub-*/**/*_desc-deviations_scores.json",
    "sub-*/**/*_zmap.nii.gz",       # deviation maps painted into aparc+aseg
    "sub-*/**/*_zmap.json",
    "sub-*/**/*_zmap.func.gii",     # per-vertex deviation maps
    "sub-*/**/*.surf.gii",          # the subject's surfaces the per-vertex maps lie on
)

_README = """\
# normdiff-bids derivatives

Normative deviation scores of FreeSurfer imaging-derived phenotypes (IDPs), computed with a
conditional denoising diffusion normative model (normdiff-bids {version}).

- `sub-<label>[/ses-<label>]/anat/*_desc-deviations_scores.tsv`: per-subject deviation table (one row
  per IDP: value, centile, z, tail flag, joint deviation); the JSON sidecar describes every column.
- `sub-<label>[/ses-<label>]/anat/*_desc-<measure>_zmap.nii.gz`: each region's z painted into the
  subject's own FreeSurfer `aparc+aseg` label volume (measure: volume, thickness, area).
- `sub-<label>[/ses-<label>]/anat/*_hemi-<L|R>_space-fsnative_desc-<measure>_zmap.func.gii`: the same
  z per vertex of the subject's white surface (`*_hemi-<L|R>_white.surf.gii`).
- `sub-<label>[_ses-<label>].html`: subject reports; `group.html`: group report.
- `phenotype/normdiff_deviations[_ses-<label>].tsv`: group tables, one row per participant (one file per
  session in longitudinal datasets, as BIDS phenotype files hold one row per participant).
- `models/`: trained model bundles and their model cards.
- `descriptions.tsv`: what each `desc-<label>` of the file names means.
- `logs/run-<UTC start>.json`: the record of each run (command line, options, package versions, times,
  failed steps; their crash reports in `logs/run-<UTC start>/`); `logs/CITATION.md` and
  `logs/CITATION.bib`: a methods paragraph for the model used, and its references.

Files BIDS has no name for are listed in `.bidsignore`.
"""

_DESCRIPTIONS_SIDECAR = {
    "Description": "The desc-<label> entities of the files in this dataset, and what each one holds",
    "desc_id": {"LongName": "Description label",
                "Description": "A desc-<label> entity used by files of this dataset"},
    "description": {"LongName": "Description",
                    "Description": "What the files with this desc label hold"},
}


def generated_by(environ: Mapping[str, str] | None = None) -> dict:
    """The ``GeneratedBy`` entry of this package, with its container when it runs in one.

    The container image sets ``NORMDIFF_CONTAINER_TYPE`` (``docker``) and ``NORMDIFF_CONTAINER_TAG``;
    Apptainer/Singularity are recognised from their own environment variables.
    """
    env = os.environ if environ is None else environ
    entry: dict = {"Name": PIPELINE_NAME, "Version": __version__,
                   "Description": "Conditional denoising diffusion normative model of FreeSurfer IDPs"}
    code_url = env.get("NORMDIFF_CODE_URL")
    if code_url:
        entry["CodeURL"] = code_url
    container: dict = {}
    if env.get("NORMDIFF_CONTAINER_TYPE"):
        container["Type"] = env["NORMDIFF_CONTAINER_TYPE"]
    elif env.get("APPTAINER_CONTAINER") or env.get("APPTAINER_NAME"):
        container["Type"] = "apptainer"
    elif env.get("SINGULARITY_CONTAINER") or env.get("SINGULARITY_NAME"):
        container["Type"] = "singularity"
    tag = env.get("NORMDIFF_CONTAINER_TAG") or env.get("APPTAINER_NAME") or env.get("SINGULARITY_NAME")
    if container and tag:
        container["Tag"] = tag
    if env.get("NORMDIFF_CONTAINER_URI") and container:
        container["URI"] = env["NORMDIFF_CONTAINER_URI"]
    if container:
        entry["Container"] = container
    return entry


def dataset_description(bids_dir: str | os.PathLike | None = None,
                        fs_dir: str | os.PathLike | None = None,
                        environ: Mapping[str, str] | None = None, *,
                        output_dir: str | os.PathLike | None = None) -> dict:
    """The ``dataset_description.json`` content this package writes for a run on ``bids_dir``.

    ``DatasetLinks`` names the raw dataset (``raw``) and the FreeSurfer folder (``freesurfer``) so that
    files can point into them with BIDS URIs (``bids:freesurfer:sub-01/mri/aparc+aseg.mgz``). When
    ``output_dir`` lies inside the raw dataset (``BIDS_DIR/derivatives/normdiff``), the links to it and
    to a FreeSurfer folder inside it are relative paths (``../..``, ``../freesurfer``), so the dataset
    can be moved or shared as a whole, and the source dataset is ``bids:raw:``; otherwise they are
    absolute ``file://`` URIs.
    """
    desc: dict = {
        "Name": "normdiff-bids normative deviations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by(environ)],
    }
    links: dict[str, str] = {}
    out = Path(output_dir).absolute().resolve() if output_dir is not None else None
    if bids_dir is not None:
        bids_dir = Path(bids_dir).resolve()
        nested = out is not None and out != bids_dir and out.is_relative_to(bids_dir)
        links["raw"] = _link(bids_dir, out if nested else None)
        source: dict = {"URL": "bids:raw:" if nested else bids_dir.as_uri()}
        raw = _read_json(bids_dir / "dataset_description.json")
        if isinstance(raw, dict):
            if isinstance(raw.get("DatasetDOI"), str) and raw["DatasetDOI"]:
                doi = raw["DatasetDOI"]
                source["DOI"] = doi if doi.startswith("doi:") else f"doi:{doi.removeprefix('https://doi.org/')}"
            if isinstance(raw.get("DatasetVersion"), str) and raw["DatasetVersion"]:
                source["Version"] = raw["DatasetVersion"]
        desc["SourceDatasets"] = [source]
        if fs_dir is not None:
            fs = Path(fs_dir).resolve()
            links["freesurfer"] = _link(fs, out if nested and fs.is_relative_to(bids_dir) else None)
    elif fs_dir is not None:
        links["freesurfer"] = Path(fs_dir).resolve().as_uri()
    if links:
        desc["DatasetLinks"] = links
    return desc


def _link(target: Path, relative_to: Path | None) -> str:
    """A ``DatasetLinks`` value: ``target`` relative to ``relative_to`` (POSIX form), or its file URI."""
    if relative_to is None:
        return target.as_uri()
    return Path(os.path.relpath(target, relative_to)).as_posix()


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _link_target(value: object, output_dir: Path, links: Mapping[str, object] | None = None) -> Path | None:
    """The local folder a ``DatasetLinks`` value (or a ``SourceDatasets`` URL) names, if it names one:
    a ``file://`` URI, a path relative to the output folder, or ``bids:<link>:`` through ``links``."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("file:"):
        return Path(unquote(urlparse(value).path)).resolve()
    if value.startswith("bids:") and links is not None:
        name, _, rest = value[len("bids:"):].partition(":")
        root = _link_target(links.get(name), output_dir) if name else output_dir.resolve()
        return (root / rest).resolve() if root is not None else None
    if _URI_SCHEME.match(value):  # doi:, https:, ...: not a local folder
        return None
    return (output_dir / value).resolve()


def bids_uri(output_dir: str | os.PathLike, path: str | os.PathLike) -> str:
    """How a file of this derivatives dataset refers to ``path``: a BIDS URI
    (``bids:<link>:<path within it>``) when it lies in a dataset that ``DatasetLinks`` of
    ``output_dir/dataset_description.json`` names (the innermost one), else its ``file://`` URI."""
    out = Path(output_dir).absolute()
    path = Path(path).resolve()
    content = _read_json(out / "dataset_description.json")
    links = content.get("DatasetLinks") if isinstance(content, dict) else None
    best: tuple[str, Path] | None = None
    for name, value in (links if isinstance(links, dict) else {}).items():
        root = _link_target(value, out)
        if root is None or not path.is_relative_to(root):
            continue
        inner = path.relative_to(root)
        if best is None or len(inner.parts) < len(best[1].parts):
            best = (str(name), inner)
    if best is None:
        return path.as_uri()
    return f"bids:{best[0]}:{best[1].as_posix()}"


def check_output_dir(output_dir: str | os.PathLike, bids_dir: str | os.PathLike | None = None) -> Path:
    """Refuse an output folder this package must not write into, before anything is written.

    Raises :class:`OutputError` when the folder is the raw dataset itself, holds another pipeline's
    dataset (its ``dataset_description.json`` names a different ``GeneratedBy``), holds an unreadable
    ``dataset_description.json``, is a file, or is not writable. Changes nothing on disk.
    """
    out = Path(output_dir).expanduser().absolute()
    if bids_dir is not None and out.resolve() == Path(bids_dir).expanduser().resolve():
        raise OutputError(f"the output folder {out} is the input BIDS dataset; write derivatives elsewhere, "
                          f"for example {Path(bids_dir) / 'derivatives' / 'normdiff'}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"the output path {out} exists and is not a folder; choose a folder")
    description = out / "dataset_description.json"
    if description.exists():
        _check_owner(description)
    _check_writable(out)
    return out


def prepare_output_dir(output_dir: str | os.PathLike, bids_dir: str | os.PathLike | None = None,
                       *, fs_dir: str | os.PathLike | None = None,
                       environ: Mapping[str, str] | None = None) -> Path:
    """Check ``output_dir`` and make it a normdiff-bids derivatives dataset; return its absolute path.

    Safe to call from several jobs at once and again on an existing output folder: the checks of
    :func:`check_output_dir` run first (nothing is written if they fail), then, under the output
    lock, ``dataset_description.json`` is merged (new ``GeneratedBy`` versions and source datasets
    are added, nothing is dropped), ``.bidsignore`` gains any missing pattern, ``descriptions.tsv``
    any missing ``desc-<label>``, and a README is written if there is none.
    """
    out = check_output_dir(output_dir, bids_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output folder {out}: {err.strerror}; "
                          "choose a folder you can write to") from err
    with output_lock(out):
        description = out / "dataset_description.json"
        if description.exists():
            _check_owner(description)  # another job may have won the race with a foreign dataset
        fresh = dataset_description(bids_dir, fs_dir, environ, output_dir=out)
        current = _read_json(description) if description.exists() else None
        merged = _merge_description(current, fresh, out) if isinstance(current, dict) else fresh
        if merged != current:
            write_json(description, merged)
        _merge_bidsignore(out / ".bidsignore")
        _merge_descriptions(out / names.DESCRIPTIONS_TABLE)
        if not (out / names.DESCRIPTIONS_SIDECAR).exists():
            write_json(out / names.DESCRIPTIONS_SIDECAR, _DESCRIPTIONS_SIDECAR)
        readme = out / "README.md"
        if not readme.exists():
            atomic_write_text(readme, _README.format(version=__version__))
    return out


def _check_owner(description: Path) -> None:
    content = _read_json(description)
    if not isinstance(content, dict):
        raise OutputError(
            f"{description} is not a readable JSON object, so the folder cannot be recognised as a "
            "normdiff-bids derivatives dataset; choose an empty folder or fix the file")
    where = description.parent
    if content.get("DatasetType", "raw") != "derivative":
        raise OutputError(
            f"the output folder {where} holds a raw BIDS dataset ({description.name} has DatasetType "
            f"{content.get('DatasetType', 'raw')!r}); write derivatives to a separate folder such as "
            f"{where / 'derivatives' / 'normdiff'}")
    names = _pipeline_names(content)
    if PIPELINE_NAME not in names:
        found = ", ".join(repr(n) for n in names) if names else "no GeneratedBy name"
        raise OutputError(
            f"the output folder {where} holds another pipeline's derivatives ({description.name} lists "
            f"{found}, not {PIPELINE_NAME!r}); refusing to write into it. Choose a separate folder, "
            f"for example {where.parent / 'normdiff'}")


def _pipeline_names(content: dict) -> list[str]:
    entries = content.get("GeneratedBy")
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        legacy = content.get("PipelineDescription")  # BIDS < 1.4
        entries = [legacy] if isinstance(legacy, dict) else []
    return [str(e.get("Name")) for e in entries if isinstance(e, dict) and e.get("Name")]


def _check_writable(out: Path) -> None:
    # Probe with a real file: os.access ignores read-only mounts for some file systems and always says
    # yes to root; the probe is removed at once, so a refused folder stays byte-identical.
    folder = out
    while not folder.exists():
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".normdiff-write-test.", dir=folder)
    except OSError as err:
        what = "output folder" if folder == out else f"parent folder of {out}"
        raise OutputError(
            f"the {what} {folder} is not writable ({err.strerror}); choose a folder you can write to, "
            "or fix its permissions (for example `chmod u+w`)") from err
    os.close(fd)
    os.unlink(probe)


def _merge_description(current: dict, fresh: dict, output_dir: Path | None = None) -> dict:
    """``current`` with what ``fresh`` adds: a new ``GeneratedBy`` version, source datasets and links.

    Nothing is dropped. A link or source that names the same folder as the fresh one in another
    spelling (an absolute ``file://`` URI where a relative path is now written) takes the fresh spelling;
    a link of the same name to another folder is kept, and the fresh one is added beside it (``raw2``).
    """
    merged = dict(current)
    entries = current.get("GeneratedBy")
    entries = [entries] if isinstance(entries, dict) else list(entries or [])
    new = fresh["GeneratedBy"][0]
    if not any(isinstance(e, dict) and e.get("Name") == new["Name"] and e.get("Version") == new["Version"]
               for e in entries):
        entries.append(new)
    merged["GeneratedBy"] = entries
    merged.setdefault("BIDSVersion", fresh["BIDSVersion"])
    merged["DatasetType"] = "derivative"

    def same(a, b, links_a, links_b) -> bool:
        if a == b:
            return True
        if output_dir is None:
            return False
        where_a, where_b = _link_target(a, output_dir, links_a), _link_target(b, output_dir, links_b)
        return where_a is not None and where_a == where_b

    old_links = dict(current.get("DatasetLinks") or {})
    fresh_links = dict(fresh.get("DatasetLinks") or {})
    links = dict(old_links)
    renamed: dict[str, str] = {}
    for key, uri in fresh_links.items():
        if key in links and not same(links[key], uri, None, None):
            # Keep the first link under its name and record the other one beside it.
            suffix = 2
            while f"{key}{suffix}" in links and not same(links[f"{key}{suffix}"], uri, None, None):
                suffix += 1
            links[f"{key}{suffix}"] = uri
            renamed[key] = f"{key}{suffix}"
        else:
            links[key] = uri
    sources = list(current.get("SourceDatasets") or [])
    for source in fresh.get("SourceDatasets", []):
        url = source.get("URL")
        for old, new_name in renamed.items():  # a BIDS URI follows its link to its new name
            if isinstance(url, str) and url.startswith(f"bids:{old}:"):
                source = {**source, "URL": f"bids:{new_name}:{url[len(f'bids:{old}:'):]}"}
        for i, known in enumerate(sources):
            if isinstance(known, dict) and same(known.get("URL"), source.get("URL"), old_links, fresh_links):
                sources[i] = {**known, **source}
                break
        else:
            sources.append(source)
    if sources:
        merged["SourceDatasets"] = sources
    if links:
        merged["DatasetLinks"] = links
    return merged


def _merge_bidsignore(path: Path, patterns: Sequence[str] = BIDSIGNORE_PATTERNS) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    present = {line.strip() for line in lines}
    missing = [p for p in patterns if p not in present]
    if missing:
        atomic_write_text(path, "\n".join([*lines, *missing]) + "\n")


def _merge_descriptions(path: Path, descriptions: Mapping[str, str] = names.DESCRIPTIONS) -> None:
    """``descriptions.tsv`` (BIDS: ``desc_id``, ``description``) with a row for every ``desc-<label>``
    of this package; rows already there (added by hand, or by another tool) are kept as they are."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if not lines:
        lines = ["desc_id\tdescription"]
    present = {line.split("\t", 1)[0] for line in lines[1:]}
    missing = [f"desc-{label}\t{text}" for label, text in descriptions.items()
               if f"desc-{label}" not in present]
    if missing or not path.exists():
        atomic_write_text(path, "\n".join([*lines, *missing]) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
