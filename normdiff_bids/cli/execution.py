"""How the workflows run: the work folder, cores and threads, the Nipype plugin and its settings, the
logging of worker processes, and a failed run raised as the error that caused it."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from normdiff_bids.cli.failures import node_error
from normdiff_bids.errors import InputError


@contextlib.contextmanager
def work_folder(work_dir: Path | None):
    """``--work-dir`` (created), else a temporary folder removed afterwards."""
    if work_dir is not None:
        path = work_dir.expanduser().absolute()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="normdiff-work-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def n_cores(opts) -> int:
    """``--nprocs``, else the CPUs this process may run on."""
    if opts.nprocs:
        return opts.nprocs
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def node_threads(opts) -> int:
    """Torch threads of a training or scoring node: ``--omp-nthreads``, else every core of ``--nprocs``."""
    return getattr(opts, "omp_nthreads", None) or n_cores(opts)


def plugin_settings(opts, serial: bool = False) -> tuple[str, dict]:
    """Nipype plugin name and arguments from ``--plugin``, ``--plugin-args``, ``--nprocs`` and
    ``--mem-gb``; values in ``--plugin-args`` win over the flags. ``serial``: the workflow is one chain
    of steps (a single participant), so without ``--plugin`` it runs in this process (Linear): worker
    processes would only add their start-up (a fresh interpreter importing torch, about 2 s a step)."""
    nprocs = n_cores(opts)
    plugin = opts.plugin or ("Linear" if nprocs == 1 or serial else "MultiProc")
    args: dict = {}
    if opts.plugin_args:
        try:
            args = json.loads(opts.plugin_args)
        except ValueError as exc:
            raise InputError(f"--plugin-args is not valid JSON ({exc}): {opts.plugin_args!r}") from None
        if not isinstance(args, dict):
            raise InputError(f"--plugin-args must be a JSON object, e.g. '{{\"n_procs\": 2}}'; "
                             f"got {opts.plugin_args!r}")
    if plugin == "MultiProc":
        args.setdefault("n_procs", nprocs)
        if getattr(opts, "mem_gb", None):
            args.setdefault("memory_gb", float(opts.mem_gb))
        # Workers start from a fresh interpreter: forking a process that already ran torch kernels can
        # deadlock OpenMP in the child.
        args.setdefault("mp_context", "forkserver")
        args.setdefault("raise_insufficient", False)
    return plugin, args


def run_workflow(wf, opts, work_dir: Path, crash_dir: Path | None = None, serial: bool = False) -> None:
    """Run ``wf`` in ``work_dir``; a node failure is raised as the user-facing error that caused it.

    Crash reports of failed steps go to ``crash_dir`` (default ``work_dir/crash/<time>``); ``serial``:
    see :func:`plugin_settings`.
    """
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    verbose = getattr(opts, "verbose", 0)
    level = "INFO" if verbose >= 2 else "WARNING" if verbose == 1 else "CRITICAL"
    # Nipype re-applies its logging config when a workflow runs, so the levels go through the config.
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, level)
    nipype_logging.update_logging(nipype_config)
    crash_dir = crash_dir if crash_dir is not None else work_dir / "crash" / time.strftime("%Y%m%d-%H%M%S")
    wf.base_dir = str(work_dir)
    # ... each node applies the workflow's own copy, and MultiProc workers (fresh interpreters) read it
    # from the configuration folder named in the environment they inherit.
    levels = {key: level for key in ("workflow_level", "interface_level", "utils_level")}
    wf.config.setdefault("logging", {}).update(levels)
    _worker_logging_config(levels)
    wf.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "poll_sleep_duration": 0.2,  # MultiProc's scheduler loop; shorter wastes a core on polling
        # Without it, steps that do not depend on a failed one (other participants) still run, and every
        # failure is reported at the end.
        "stop_on_first_crash": bool(getattr(opts, "stop_on_first_crash", False)),
        "remove_unnecessary_outputs": False,
    })
    nipype_config.set("execution", "check_version", "false")
    plugin, plugin_args = plugin_settings(opts, serial=serial)
    if plugin.upper().startswith("SLURM"):
        _default_logname()
    # MultiProc runs a full garbage collection on every scheduler pass; what this process holds by now
    # (the checked inputs, pybids' index, torch) is long-lived, so it is moved out of the collector's
    # sight: a participant-level run spent 3 of its 9 seconds in those collections.
    gc.collect()
    gc.freeze()
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:
        if verbose >= 2:
            raise
        raise node_error(exc, crash_dir) from None
    finally:
        gc.unfreeze()


def _default_logname() -> None:
    """Nipype's SLURM plugins name each job after ``$LOGNAME``, which batch jobs, containers and cron
    often lack (a ``KeyError`` deep in the plugin otherwise)."""
    if os.environ.get("LOGNAME"):
        return
    try:
        import getpass
        os.environ["LOGNAME"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers run with -u)
        os.environ["LOGNAME"] = "normdiff"


def _worker_logging_config(levels: dict) -> None:
    """Write Nipype's logging levels where worker processes of this process will read them."""
    import atexit

    folder = Path(tempfile.gettempdir()) / f"normdiff-nipype-config-{os.getpid()}"
    if os.environ.get("NIPYPE_CONFIG_DIR") != str(folder):
        folder.mkdir(exist_ok=True)
        atexit.register(shutil.rmtree, folder, True)
        os.environ["NIPYPE_CONFIG_DIR"] = str(folder)
    text = "[logging]\n" + "".join(f"{key} = {value}\n" for key, value in levels.items())
    (folder / "nipype.cfg").write_text(text)


def uses_gpu(device: str) -> bool:
    """Whether the nodes run on a GPU: ``--device cuda[:N]``, or ``auto`` on a machine with one."""
    if device.startswith("cuda"):
        return True
    if device != "auto" or not _may_have_cuda():
        return False
    import torch

    return torch.cuda.is_available()


def _may_have_cuda() -> bool:
    """False only where CUDA cannot work, told without importing torch (about 1.4 s): on Linux, no NVIDIA
    device node and no WSL GPU device."""
    if not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "nvidiactl").exists() or (dev / "dxg").exists()
