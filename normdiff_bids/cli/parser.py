"""Argument parser of the ``normdiff-bids`` BIDS-App (argparse only: building it runs nothing)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from normdiff_bids._version import __version__
from normdiff_bids.model.backbones import backbone_names

#: Nipype execution plugins the BIDS-App accepts (HPC plugins take ``--plugin-args``).
PLUGINS = ("Linear", "MultiProc", "SLURM", "SLURMGraph", "SGE", "PBS", "LSF")
DEFAULT_MODEL_NAME = "default"

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _whole_number(minimum: int):
    """An argparse ``type`` for whole numbers of at least ``minimum``."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be {minimum} or more")
        return value

    return convert


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 0.9:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0 and below 0.9")
    return value


def _covariate(text: str) -> str:
    """``COLUMN[:KIND]`` of ``--covariate``, checked (the covariate itself is built by the run)."""
    from normdiff_bids.covariate_spec import parse_covariate_option
    from normdiff_bids.errors import InputError

    try:
        spec = parse_covariate_option(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--covariate ", "", 1)) from None
    return spec.column if spec.kind is None else f"{spec.column}:{spec.kind}"


class _Repeatable(argparse.Action):
    """``--opt A B --opt C`` gives ``[A, B, C]``; the command line's values replace a config file's."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        # still the default object (the parser's or a config file's): the first use on the command line
        items = [] if current is self.default or current is None else list(current)
        setattr(namespace, self.dest, items + list(values))


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    return text


def _model_name(text: str) -> str:
    if not _MODEL_NAME.match(text) or text in {".", ".."}:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid model name; use letters, digits, '.', '_' or '-' (no slashes)")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The BIDS-App parser: ``normdiff-bids BIDS_DIR OUTPUT_DIR {group,participant} [options]``."""
    parser = argparse.ArgumentParser(
        prog="normdiff-bids",
        description=(
            "Joint normative models of FreeSurfer IDPs with conditional denoising diffusion. "
            "'group' fits a model on the reference participants, evaluates it on a held-out split and "
            "writes group tables and a report; 'participant' scores participants against a trained "
            "model and writes their deviation tables, maps and reports. Both levels can be given in one "
            "call ('group participant'); group always runs first."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path,
                        help="the raw BIDS dataset (participants.tsv holds the covariates)")
    parser.add_argument("output_dir", type=Path,
                        help="the derivatives folder to write (recommended: BIDS_DIR/derivatives/normdiff)")
    parser.add_argument("analysis_level", nargs="+", choices=("group", "participant"),
                        metavar="{group,participant}",
                        help="processing stage(s): group (fit + evaluate + group outputs), "
                             "participant (score)")
    parser.add_argument("--version", action="version", version=f"normdiff-bids {__version__}")

    sel = parser.add_argument_group("Selecting data")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL", default=None,
                     help="participants to process (with or without 'sub-'); default: all")
    sel.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL", default=None,
                     help="sessions to process (with or without 'ses-'); default: all")
    sel.add_argument("--fs-dir", "--fs-subjects-dir", type=Path, default=None,
                     help="FreeSurfer SUBJECTS_DIR; default: BIDS_DIR/derivatives/freesurfer, then "
                          "derivatives/{fmriprep,smriprep}/sourcedata/freesurfer")
    sel.add_argument("--longitudinal", action="store_true",
                     help="read FreeSurfer's longitudinal stream (the "
                          "sub-<label>_ses-<label>.long.<template> folders) instead of the cross-sectional "
                          "sub-<label>[_ses-<label>] folders")
    sel.add_argument("--idp-set", nargs="+", default=["aseg"], metavar="SET",
                     help="IDPs to model: named sets (aseg, aparc-thickness, aparc-area, aparc-volume, "
                          "global, all, ...), IDP names or globs")
    sel.add_argument("--reference-query", default=None, metavar="QUERY",
                     help="expression over participants.tsv columns selecting the normative reference, "
                          "e.g. \"diagnosis == 'HC' and age >= 18\": columns, numbers, quoted text, "
                          "== != < <= > >=, in [...], and/or/not (& | ~), parentheses; parsed, never run "
                          "as code; default: every participant")
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                     help="do not check BIDS_DIR with the BIDS validator (bids-validator-deno, when "
                          "installed) first; by default its errors stop the run before anything is written "
                          "(--reports-only never validates: it re-draws reports from what OUTPUT_DIR holds)")
    sel.add_argument("--age-column", default="age", help="participants.tsv / sessions.tsv column holding age")
    sel.add_argument("--sex-column", default="sex", help="participants.tsv column holding sex")
    sel.add_argument("--site-column", default="site",
                     help="participants.tsv column holding the acquisition site ('none' if there is none)")
    sel.add_argument("--covariate", nargs="+", action=_Repeatable, type=_covariate, default=[],
                     metavar="COLUMN[:KIND]",
                     help="a further participants.tsv column the model is conditioned on, besides age, sex "
                          "and site (repeatable); KIND is continuous or categorical, inferred from the "
                          "values when left out (numbers: continuous), e.g. --covariate tiv "
                          "scanner:categorical")

    mod = parser.add_argument_group("Model")
    mod.add_argument("--model", type=Path, default=None,
                     help="participant level: the model bundle to score against; default: "
                          "OUTPUT_DIR/models/<model-name>, as written by the group level")
    mod.add_argument("--from-model", type=Path, default=None, metavar="PATH",
                     help="group level: adapt this trained model bundle to the new sites of this "
                          "dataset's reference participants (only their site effects are learnt, in "
                          "seconds) instead of training from scratch; installed as models/<model-name>")
    mod.add_argument("--model-name", type=_model_name, default=DEFAULT_MODEL_NAME,
                     help="name of the model folder under OUTPUT_DIR/models/")
    mod.add_argument("--overwrite-model", action="store_true",
                     help="group level: replace an existing, different model of the same name "
                          "(default: refuse, so a trained model is never lost)")
    mod.add_argument("--backbone", choices=backbone_names(), default="film-mlp", help="denoising network")
    mod.add_argument("--epochs", type=_positive_int, default=None,
                     help="training epochs; default: a budget chosen from N and D, with early stopping")
    mod.add_argument("--n-samples", type=_positive_int, default=None,
                     help="model samples drawn per participant to score centiles; default: the model's")
    mod.add_argument("--condition-on", nargs="+", default=None, metavar="IDP",
                     help="also score every other IDP conditionally on the participant's own values of "
                          "these IDPs, e.g. EstimatedTotalIntraCranialVol (in --idp-set global): adds "
                          "<idp>_cond_centile and <idp>_cond_z columns and a 'given' section to the reports")
    mod.add_argument("--holdout-fraction", type=_fraction, default=0.2,
                     help="share of the reference held out (stratified by site and sex) to evaluate "
                          "the model")
    mod.add_argument("--unknown-site", choices=("error", "marginal"), default="error",
                     help="participants from a site the model never saw: stop with an error, or score them "
                          "against the mixture over the training sites")
    mod.add_argument("--model-options", default=None, metavar="JSON",
                     help="further NormativeDiffusion hyper-parameters as a JSON object, e.g. "
                          "'{\"sampler\": \"ddpm\", \"backbone_config\": {\"hidden\": 128}}'; unknown names "
                          "are refused")
    mod.add_argument("--seed", type=_non_negative_int, default=0,
                     help="random seed (train/held-out split, training, sampling)")
    mod.add_argument("--device", type=_device, default="auto",
                     help="torch device: auto (cuda if present), cpu, cuda, cuda:N; a device this "
                          "machine lacks is refused up front (Linear/MultiProc plugins)")

    run = parser.add_argument_group("Execution")
    run.add_argument("-w", "--work-dir", type=Path, default=None,
                     help="Nipype working folder (cache): rerunning with the same folder resumes a crashed "
                          "run; default: a temporary folder removed at the end")
    run.add_argument("--nprocs", "--n-cpus", "--n_cpus", "--nthreads", type=_positive_int, default=None,
                     help="CPU cores to use: processes of the MultiProc plugin; default: all CPUs")
    run.add_argument("--omp-nthreads", type=_positive_int, default=None,
                     help="torch threads of each training or scoring process (and the cores MultiProc "
                          "reserves for it); default: --nprocs")
    run.add_argument("--mem-gb", type=_positive_number, default=None, metavar="GB",
                     help="memory the MultiProc plugin may schedule, in GB (its memory_gb); default: what "
                          "the machine has")
    run.add_argument("--plugin", choices=PLUGINS, default=None,
                     help="Nipype plugin; default: MultiProc, or Linear when --nprocs is 1")
    run.add_argument("--plugin-args", default=None, metavar="JSON",
                     help="plugin arguments as a JSON object, e.g. '{\"sbatch_args\": \"-p short\"}'")
    run.add_argument("--stop-on-first-crash", action="store_true",
                     help="stop at the first failed step; default: run every step that does not depend on "
                          "a failed one (other participants), then list the failures and exit non-zero")
    run.add_argument("--reports-only", action="store_true",
                     help="participant level: re-write the selected participants' reports from the group "
                          "tables and files already in OUTPUT_DIR, without scoring or rewriting them")
    run.add_argument("--quiet", action="store_true", help="no progress bars (sets NORMDIFF_QUIET=1)")
    run.add_argument("-v", "--verbose", action="count", default=0,
                     help="more log output (-vv: Nipype node messages and full tracebacks)")
    run.add_argument("--config-file", type=Path, default=None, metavar="TOML",
                     help="options from a TOML file, one key per option (its long name, e.g. "
                          "n-samples = 500, idp-set = [\"aseg\", \"global\"], quiet = true); options on "
                          "the command line win")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the BIDS-App's command line, with the defaults of ``--config-file`` when one is given.

    Raises :class:`~normdiff_bids.errors.InputError` for a config file that cannot be used (naming the
    file, the key and the fix); the command line's own errors exit through argparse as usual.
    """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-file", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config_file is not None:
        parser.set_defaults(**read_config(known.config_file, parser))
    return parser.parse_args(argv)


def read_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    """The option defaults a TOML config file sets, checked with the options' own types and choices."""
    import difflib
    import tomllib

    from normdiff_bids.errors import InputError, ProblemCollector

    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--config-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--config-file {path} cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config-file {path} is not valid TOML: {exc}; write one option per line, "
                         f"e.g. n-samples = 500") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version",
                                                                                       "config_file")}
    names = sorted(a.option_strings[-1].lstrip("-") for a in actions.values())
    problems = ProblemCollector()
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            close = difflib.get_close_matches(str(key).replace("_", "-"), names, n=1)
            problems.add(f"{key!r} is not an option" + (f"; did you mean {close[0]!r}?" if close else
                                                        f"; options are {', '.join(names)}"))
            continue
        try:
            defaults[dest] = _config_value(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            problems.add(f"{key} = {value!r}: {exc}")
    problems.raise_if_any(header=f"--config-file {path} cannot be used")
    return defaults


def _config_value(action: argparse.Action, value):
    """``value`` (from TOML) as the option would have parsed it on the command line."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError("use true or false")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("use a whole number (0, 1, 2)")
        return value
    many = action.nargs in ("+", "*")
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise ValueError("takes one value, not a list")
    if many and not items:
        raise ValueError("needs at least one value")
    if any(isinstance(v, dict | list) for v in items):
        raise ValueError("values must be strings or numbers")
    convert = action.type or str
    out = [convert(str(v)) for v in items]
    if action.choices is not None:
        bad = [v for v in out if v not in action.choices]
        if bad:
            raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return out if many else out[0]
