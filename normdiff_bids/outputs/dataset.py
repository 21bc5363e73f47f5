"""The derivatives dataset as a whole: checking the output folder, ``dataset_description.json``,
``.bidsignore``, README, and a lock so that parallel jobs can share one output folder.

Files shared between jobs (``dataset_description.json``, ``.bidsignore``, group tables) are only
changed as read-merge-write under :func:`output_lock`, and always replaced atomically, so two
participant-level jobs writing into one folder at once both succeed and nothing is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_write_text
from normdiff_bids.bidsio import json_ready, write_json
from normdiff_bids.errors import OutputError
from normdiff_bids.outputs import names

PIPELINE_NAME = "normdiff-bids"
#: BIDS version the derivatives follow.
BIDS_VERSION = "1.10.0"
#: Lock file shared by jobs writing into one output folder (a dot-file: the BIDS validator skips it).
LOCK_NAME = ".normdiff.lock"

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
- `logs/run-<UTC start>.json`: the record of each run (command line, options, package versions, times,
  failed steps; their crash reports in `logs/run-<UTC start>/`); `logs/CITATION.md` and
  `logs/CITATION.bib`: a methods paragraph for the model used, and its references.

Files BIDS has no name for are listed in `.bidsignore`.
"""

_thread_lock = threading.RLock()
_held: dict[Path, int] = {}


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir`` (blocks until other jobs release it).

    An ``fcntl.flock`` on ``<output_dir>/.normdiff.lock`` serialises processes (Nipype MultiProc
    workers, SLURM array tasks sharing a file system); a thread lock serialises threads of one process.
    The lock file is left in place: removing it would let a waiting job lock a file nobody else sees.
    """
    path = (Path(output_dir) / LOCK_NAME).absolute()
    with _thread_lock:
        if _held.get(path):
            # Re-entry from the same thread: a second flock on a new descriptor would wait on itself.
            _held[path] += 1
            try:
                yield
            finally:
                _held[path] -= 1
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot create the lock file {path}: {err.strerror}; "
                              "check that the output folder is writable") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _held[path] = 1
            yield
        finally:
            _held.pop(path, None)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


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
                        environ: Mapping[str, str] | None = None) -> dict:
    """The ``dataset_description.json`` content this package writes for a run on ``bids_dir``."""
    desc: dict = {
        "Name": "normdiff-bids normative deviations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by(environ)],
    }
    links: dict[str, str] = {}
    if bids_dir is not None:
        bids_dir = Path(bids_dir).resolve()
        source: dict = {"URL": bids_dir.as_uri()}
        raw = _read_json(bids_dir / "dataset_description.json")
        if isinstance(raw, dict):
            if isinstance(raw.get("DatasetDOI"), str) and raw["DatasetDOI"]:
                doi = raw["DatasetDOI"]
                source["DOI"] = doi if doi.startswith("doi:") else f"doi:{doi.removeprefix('https://doi.org/')}"
            if isinstance(raw.get("DatasetVersion"), str) and raw["DatasetVersion"]:
                source["Version"] = raw["DatasetVersion"]
        desc["SourceDatasets"] = [source]
        links["raw"] = bids_dir.as_uri()
    if fs_dir is not None:
        links["freesurfer"] = Path(fs_dir).resolve().as_uri()
    if links:
        desc["DatasetLinks"] = links
    return desc


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
    are added, nothing is dropped), ``.bidsignore`` gains any missing pattern, and a README is
    written if there is none.
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
        fresh = dataset_description(bids_dir, fs_dir, environ)
        current = _read_json(description) if description.exists() else None
        merged = _merge_description(current, fresh) if isinstance(current, dict) else fresh
        if merged != current:
            write_json(description, merged)
        _merge_bidsignore(out / ".bidsignore")
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


def _merge_description(current: dict, fresh: dict) -> dict:
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
    sources = list(current.get("SourceDatasets") or [])
    for source in fresh.get("SourceDatasets", []):
        if all(s.get("URL") != source.get("URL") for s in sources if isinstance(s, dict)):
            sources.append(source)
    if sources:
        merged["SourceDatasets"] = sources
    links = dict(current.get("DatasetLinks") or {})
    for key, uri in fresh.get("DatasetLinks", {}).items():
        if key in links and links[key] != uri:
            # Keep the first link under its name and record the other one beside it.
            suffix = 2
            while f"{key}{suffix}" in links and links[f"{key}{suffix}"] != uri:
                suffix += 1
            links[f"{key}{suffix}"] = uri
        else:
            links[key] = uri
    if links:
        merged["DatasetLinks"] = links
    return merged


def _merge_bidsignore(path: Path, patterns: Sequence[str] = BIDSIGNORE_PATTERNS) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    present = {line.strip() for line in lines}
    missing = [p for p in patterns if p not in present]
    if missing:
        atomic_write_text(path, "\n".join([*lines, *missing]) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_model_card(output_dir: str | os.PathLike, card: Mapping, name: str = "default") -> list[Path]:
    """Write a model card beside its bundle: ``models/<name>_modelcard.json`` and a readable ``.md``.

    The card lives outside the bundle folder so that the bundle's own files stay exactly as saved.
    """
    output_dir = Path(output_dir)
    json_path = output_dir / names.model_card_path(name, ".json")
    md_path = output_dir / names.model_card_path(name, ".md")
    write_json(json_path, dict(card))
    lines = [f"# Model card: {name}", ""]
    lines += _markdown_rows(card)
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return [json_path, md_path]


def _markdown_rows(card: Mapping, prefix: str = "") -> list[str]:
    rows = []
    for key, value in card.items():
        if isinstance(value, Mapping) and value:
            rows.extend(_markdown_rows(value, prefix=f"{prefix}{key}."))
        elif isinstance(value, list) and len(value) > 12:
            rows.append(f"- **{prefix}{key}**: {len(value)} items: {', '.join(map(str, value[:8]))}, ...")
        else:
            text = json.dumps(json_ready(value)) if isinstance(value, Mapping | list) else str(value)
            rows.append(f"- **{prefix}{key}**: {text}")
    return rows
