"""What each run did, and how to cite it: the files of the derivatives' ``logs/`` folder.

``logs/run-<UTC start>.json`` records one run: command line, resolved options, package versions, start,
end, duration and the steps that failed. It is written as the run starts (``status: running``) and
replaced when it ends, so a run that was killed is still on record. ``logs/CITATION.md`` is a methods
paragraph describing the model the last run used, and ``logs/CITATION.bib`` holds its references.
BIDS leaves ``logs/`` free-form, so the validator does not look inside.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_write_text
from normdiff_bids.bidsio import write_json
from normdiff_bids.outputs import names
from normdiff_bids.outputs.dataset import output_lock

#: Packages whose versions every run record holds (the distribution names on PyPI).
RECORDED_PACKAGES: tuple[str, ...] = ("normdiff-bids", "torch", "numpy", "nipype", "pandas")
#: Software the project's home page is at (the software reference of the methods text).
CODE_URL = "https://github.com/normdiff/normdiff-bids"


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`RECORDED_PACKAGES` (None when one is not installed) and of Python.

    Read from the installed distributions' metadata, so nothing (torch included) is imported.
    """
    versions: dict[str, str | None] = {}
    for package in RECORDED_PACKAGES:
        if package == "normdiff-bids":
            versions[package] = __version__  # the running code, also from a source checkout
            continue
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["python"] = platform.python_version()
    return versions


# -------------------------------------------------------------------------------------------------------
# run records
# -------------------------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """The record of one run, kept in ``logs/run-<run_id>.json`` while the run goes on.

    >>> record = RunRecord.start(output_dir, {"command_line": "normdiff-bids ..."}, started)  # doctest: +SKIP
    >>> record.finish("success", 0, ended, seconds=12.5)  # doctest: +SKIP
    """

    output_dir: Path
    run_id: str
    data: dict = field(default_factory=dict)

    @classmethod
    def start(cls, output_dir: str | os.PathLike, data: Mapping, started: datetime) -> RunRecord:
        """Reserve the record of a run that started at ``started`` (aware, UTC) and write ``data`` there.

        The name is the UTC start to the second; runs that started in the same second (array jobs
        sharing one output folder) get ``-2``, ``-3``, ... The name is chosen under the output lock.
        """
        output_dir = Path(output_dir)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        with output_lock(output_dir):
            n = 1
            while True:
                run_id = stamp if n == 1 else f"{stamp}-{n}"
                taken = [output_dir / names.run_record_path(run_id), output_dir / names.run_crash_dir(run_id)]
                if not any(p.exists() for p in taken):
                    break
                n += 1
            record = cls(output_dir=output_dir, run_id=run_id,
                         data={"run_id": run_id, "status": "running", **dict(data),
                               "start": started.isoformat(timespec="seconds")})
            record.write()
        return record

    @property
    def path(self) -> Path:
        return self.output_dir / names.run_record_path(self.run_id)

    @property
    def crash_dir(self) -> Path:
        """Where the crash reports of this run's failed steps go (created only when a step fails)."""
        return self.output_dir / names.run_crash_dir(self.run_id)

    def finish(self, status: str, exit_code: int, ended: datetime, *, seconds: float,
               error: str | None = None, failures: list[dict] | None = None) -> Path:
        """Complete the record: ``status`` (success, failed or interrupted), exit status, end, duration,
        the error message and one entry per failed step (``node``, ``message``, ``crash_file``)."""
        self.data.update(status=status, exit_code=int(exit_code), end=ended.isoformat(timespec="seconds"),
                         seconds=round(float(seconds), 1))
        if error is not None:
            self.data["error"] = error
        if failures:
            self.data["failures"] = [dict(f) for f in failures]
        return self.write()

    def write(self) -> Path:
        return write_json(self.path, self.data, ensure_ascii=False)


# -------------------------------------------------------------------------------------------------------
# methods text and references
# -------------------------------------------------------------------------------------------------------

#: BibTeX entries, by citation key; the methods text cites them as ``[@key]``.
REFERENCES: dict[str, str] = {
    "whitbread2026": """@misc{whitbread2026,
  author = {Whitbread, Luke and Palmer, Lyle J. and Jenkinson, Mark},
  title = {Denoising diffusion networks for normative modeling in neuroimaging},
  year = {2026},
  eprint = {2602.04886},
  archivePrefix = {arXiv},
  primaryClass = {cs.LG},
  doi = {10.48550/arXiv.2602.04886},
  url = {https://arxiv.org/abs/2602.04886}
}""",
    "nipype": """@article{nipype,
  author = {Gorgolewski, Krzysztof and Burns, Christopher D. and Madison, Cindee and Clark, Dav and
            Halchenko, Yaroslav O. and Waskom, Michael L. and Ghosh, Satrajit S.},
  title = {Nipype: a flexible, lightweight and extensible neuroimaging data processing framework in Python},
  journal = {Frontiers in Neuroinformatics},
  volume = {5},
  pages = {13},
  year = {2011},
  doi = {10.3389/fninf.2011.00013}
}""",
    "pytorch": """@inproceedings{pytorch,
  author = {Paszke, Adam and Gross, Sam and Massa, Francisco and Lerer, Adam and
            Bradbury, James and Chanan, Gregory and Killeen, Trevor and Lin, Zeming and
            Gimelshein, Natalia and Antiga, Luca and Desmaison, Alban and K{\\"o}pf, Andreas and
            Yang, Edward and DeVito, Zachary and Raison, Martin and Tejani, Alykhan and
            Chilamkurthy, Sasank and Steiner, Benoit and Fang, Lu and Bai, Junjie and Chintala, Soumith},
  title = {{PyTorch}: An Imperative Style, High-Performance Deep Learning Library},
  booktitle = {Advances in Neural Information Processing Systems 32 (NeurIPS 2019)},
  pages = {8024--8035},
  year = {2019}
}""",
    "freesurfer": """@article{freesurfer,
  author = {Fischl, Bruce},
  title = {{FreeSurfer}},
  journal = {NeuroImage},
  volume = {62},
  number = {2},
  pages = {774--781},
  year = {2012},
  doi = {10.1016/j.neuroimage.2012.01.021}
}""",
}

_REFERENCE_TEXT = {
    "whitbread2026": "Whitbread L, Palmer LJ, Jenkinson M (2026). Denoising diffusion networks for normative "
                     "modeling in neuroimaging. arXiv:2602.04886.",
    "nipype": "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS (2011). "
              "Nipype: a flexible, lightweight and extensible neuroimaging data processing framework in "
              "Python. Frontiers in Neuroinformatics 5:13. doi:10.3389/fninf.2011.00013.",
    "pytorch": "Paszke A, Gross S, Massa F, et al. (2019). PyTorch: an imperative style, high-performance "
               "deep learning library. Advances in Neural Information Processing Systems 32 (NeurIPS "
               "2019), 8024-8035.",
    "freesurfer": "Fischl B (2012). FreeSurfer. NeuroImage 62(2):774-781. "
                  "doi:10.1016/j.neuroimage.2012.01.021.",
}

_BACKBONES = {"film-mlp": "FiLM-conditioned multilayer perceptron",
              "saint": "SAINT (feature self-attention and intersample attention transformer)"}
_SAMPLERS = {"ddpm": "ancestral DDPM", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)",
             "dpmpp2m-sde": "DPM-Solver++(2M) SDE"}


def software_reference(version: str = __version__) -> str:
    """BibTeX entry of this package (key ``normdiff_bids``)."""
    return (f"@software{{normdiff_bids,\n  author = {{{{normdiff-bids developers}}}},\n"
            f"  title = {{normdiff-bids: joint normative models of brain IDPs with conditional denoising "
            f"diffusion}},\n  version = {{{version}}},\n  url = {{{CODE_URL}}}\n}}")


def citation_bibtex(version: str = __version__) -> str:
    """``CITATION.bib``: this package and every reference the methods text cites."""
    return "\n\n".join([software_reference(version), *REFERENCES.values()]) + "\n"


def methods_text(card: Mapping | None, versions: Mapping[str, str | None]) -> str:
    """``CITATION.md``: a methods paragraph for the model ``card`` (a model card; None when the run used
    no known model), citing the method, the tools and FreeSurfer, and the references in full."""
    version = versions.get("normdiff-bids") or __version__

    def tool(name: str, package: str, key: str) -> str:
        found = versions.get(package)
        return f"{name} {found} [@{key}]" if found else f"{name} [@{key}]"

    nipype, torch = tool("Nipype", "nipype", "nipype"), tool("PyTorch", "torch", "pytorch")
    sentences = [
        f"Normative deviation scores were computed with normdiff-bids {version} [@normdiff_bids], an "
        f"implementation of the conditional denoising diffusion normative models of Whitbread, Palmer and "
        f"Jenkinson [@whitbread2026], built on {nipype} and {torch}."]
    sentences += _model_sentences(card) if card else [
        "Imaging-derived phenotypes (IDPs) measured by FreeSurfer [@freesurfer] were modelled jointly, "
        "conditional on the participants' covariates, and each participant's IDPs were scored against "
        "samples drawn from the model at that participant's own covariates."]
    lines = [
        "# Methods",
        "",
        f"*Written by normdiff-bids {version} from the model of the last run in this folder. Copy it into a "
        "methods section as it is or edited; the citation keys refer to `CITATION.bib`.*",
        "",
        " ".join(sentences),
        "",
        "## References",
        "",
        f"- normdiff-bids developers. normdiff-bids {version}. {CODE_URL}",
        *[f"- {text}" for text in _REFERENCE_TEXT.values()],
    ]
    return "\n".join(lines) + "\n"


def _model_sentences(card: Mapping) -> list[str]:
    idps = list(card.get("idps") or [])
    covariates = [c.get("name") for c in card.get("covariates") or [] if isinstance(c, Mapping)]
    backbone = str(card.get("backbone", "denoising"))
    network = _BACKBONES.get(backbone, f"'{backbone}'")
    n_train = card.get("n_train")
    trained = f"was trained on {n_train} reference observations and " if n_train else ""
    listed = f": {_listing(idps)}" if idps else ""
    out = [f"The model {trained}describes {len(idps)} FreeSurfer [@freesurfer] imaging-derived phenotypes "
           f"(IDPs{listed}) jointly, conditional on {_listing(covariates)}."]
    stage = card.get("location_scale")
    if isinstance(stage, Mapping) and stage:
        given = _listing(stage.get("network_covariates") or [])
        site = stage.get("site_covariate")
        effects = stage.get("site_effects")
        out.append(
            "Each IDP was first standardised by a location-scale model of the covariates"
            + (f", with {site} effects {effects}" if site and effects else "")
            + f"; a conditional denoising diffusion probabilistic model with a {network} denoising network "
              f"then learnt the joint distribution of the standardised residuals"
            + (f" given {given}" if given else "") + ".")
    else:
        out.append(f"A conditional denoising diffusion probabilistic model with a {network} denoising "
                   f"network learnt their joint distribution given the covariates.")
    n_networks = card.get("n_networks")
    if isinstance(n_networks, int) and n_networks > 1:
        out.append(f"{n_networks} such networks were trained with different random seeds on the same "
                   "observations, and each participant's samples were split equally between them.")
    calibration = card.get("calibration")
    if isinstance(calibration, Mapping) and calibration.get("applied"):
        method = calibration.get("method", "split-conformal calibration")
        controls = calibration.get("n_controls")
        out.append(f"Centiles were recalibrated with {method}"
                   + (f" ({controls} controls)" if controls else "") + ".")
        joint = calibration.get("joint_correction")
        if isinstance(joint, Mapping) and isinstance(joint.get("n_folds"), int):
            out.append("The joint deviation's centile was recalibrated among the controls' joint deviations, "
                       "each computed under a model fitted with the same settings without that control "
                       f"({joint['n_folds']}-fold cross-fitting).")
        elif isinstance(joint, Mapping) and isinstance(joint.get("shift_z"), int | float):
            out.append("The joint deviation's centile was recalibrated among the controls' cross-fitted "
                       "joint deviations, lowered by the in-sample bias of the dependence the network learnt "
                       f"from those controls ({joint['shift_z']:.3f} in probit).")
        elif isinstance(joint, Mapping) and joint.get("applied") and joint.get("n_unseen"):
            out.append("The joint deviation's centile was recalibrated among the controls' cross-fitted "
                       f"joint deviations and checked on {joint['n_unseen']} controls that no part of the "
                       "model had seen.")
    if card.get("adaptations"):
        out.append("The model was adapted to sites it had not been trained on from those sites' own "
                   "controls, without retraining the network.")
    sampler = card.get("sampler")
    drawn = (f" ({_SAMPLERS.get(str(sampler), str(sampler))} sampler, {card.get('steps')} steps)"
             if sampler and card.get("steps") else "")
    n_samples = card.get("n_samples")
    out.append(
        f"For each participant, {n_samples or 'many'} samples were drawn from the model at the participant's "
        f"own covariates{drawn}. An IDP's centile is the mid-rank fraction of samples below the observed "
        "value and its z-score the normal deviate of that centile; the joint deviation of all IDPs is the "
        "Mahalanobis length of the vector of per-IDP normal scores, expressed as a centile among the "
        "model's own samples.")
    return out


def _listing(items, n: int = 6) -> str:
    items = [str(i) for i in items]
    if len(items) > n:
        return ", ".join(items[:n]) + f" and {len(items) - n} more"
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" and {items[-1]}"


def write_citation(output_dir: str | os.PathLike, card: Mapping | None,
                   versions: Mapping[str, str | None] | None = None) -> list[Path]:
    """Write ``logs/CITATION.md`` and ``logs/CITATION.bib`` for the model ``card``; return the paths.

    Without a card (a run that failed before its model was known) the files of an earlier run are kept;
    only a folder that has none gets the general text.
    """
    output_dir = Path(output_dir)
    md, bib = output_dir / names.citation_path(".md"), output_dir / names.citation_path(".bib")
    if card is None and md.exists():
        return []
    versions = package_versions() if versions is None else versions
    version = versions.get("normdiff-bids") or __version__
    atomic_write_text(md, methods_text(card, versions))
    atomic_write_text(bib, citation_bibtex(version))
    return [md, bib]
