"""``normdiff-synth``: write a synthetic BIDS dataset with FreeSurfer outputs and a known ground truth."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from normdiff_bids._version import __version__
from normdiff_bids.errors import NormdiffError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normdiff-synth",
        description="Write a synthetic BIDS raw dataset (participants.tsv, tiny T1w images) with a "
                    "derivatives/freesurfer folder in the real FreeSurfer formats and the ground truth "
                    "(true centiles, generator) under sourcedata/groundtruth.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to create")
    parser.add_argument("--n-subjects", type=int, default=20, metavar="N", help="participants (default 20)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--n-idps", type=int, default=None, metavar="D",
                        help="IDPs with recorded true centiles (default: all aseg and DK IDPs written)")
    parser.add_argument("--n-sites", type=int, default=3, metavar="K", help="acquisition sites (default 3)")
    parser.add_argument("--sessions", type=int, default=1, metavar="K",
                        help="visits per participant; >1 writes ses-XX folders and sessions.tsv (default 1)")
    parser.add_argument("--fs-version", choices=("7", "6", "mixed"), default="7",
                        help="FreeSurfer spelling of the stats files; 'mixed' draws 6 or 7 per participant")
    parser.add_argument("--patients", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of participants with a known medial-temporal atrophy (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--version", action="version", version=f"normdiff-synth {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the dataset; return 0 on success, the error's exit code (printed, no traceback) otherwise."""
    opts = build_parser().parse_args(argv)
    from normdiff_bids.data.synthetic import write_synthetic_dataset

    start = time.monotonic()
    try:
        out = write_synthetic_dataset(
            opts.out_dir, n_subjects=opts.n_subjects, seed=opts.seed, n_idps=opts.n_idps,
            n_sites=opts.n_sites, sessions=opts.sessions, fs_version=opts.fs_version,
            patients=opts.patients, overwrite=opts.overwrite)
    except NormdiffError as exc:
        print(f"normdiff-synth: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except FileExistsError:
        print(f"normdiff-synth: error: {opts.out_dir} already exists; choose another folder or pass "
              "--overwrite", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"normdiff-synth: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"normdiff-synth: error: cannot write {opts.out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    print(f"normdiff-synth: wrote {opts.n_subjects} participants to {out} in "
          f"{time.monotonic() - start:.1f} s (ground truth in {out / 'sourcedata' / 'groundtruth'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
