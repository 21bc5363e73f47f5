"""Execution options with fMRIPrep's spellings: cores and threads, memory, the FreeSurfer folder alias, and
whether a run stops at its first failed step or finishes what it can and lists every failure."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from normdiff_bids.cli.parser import build_parser
from normdiff_bids.cli.run import (
    NodeError,
    check_inputs,
    group_workflow,
    main,
    plugin_settings,
    run_workflow,
)


def _parse(*extra):
    return build_parser().parse_args(["in", "out", "group", *extra])


@pytest.mark.parametrize("spelling", ["--nprocs", "--n-cpus", "--n_cpus", "--nthreads"])
def test_every_spelling_of_the_core_count_sets_nprocs(spelling):
    assert _parse(spelling, "3").nprocs == 3


def test_fs_subjects_dir_is_fs_dir():
    assert _parse("--fs-subjects-dir", "/data/fs").fs_dir == Path("/data/fs")
    assert _parse("--fs-dir", "/data/fs").fs_dir == Path("/data/fs")


def test_execution_defaults():
    opts = _parse()
    assert (opts.nprocs, opts.omp_nthreads, opts.mem_gb) == (None, None, None)
    assert opts.stop_on_first_crash is False


@pytest.mark.parametrize("bad", [["--omp-nthreads", "0"], ["--mem-gb", "0"], ["--mem-gb", "lots"],
                                 ["--mem-gb", "nan"], ["--nthreads", "-1"]])
def test_bad_execution_values_are_refused_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(*bad)
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_mem_gb_goes_to_multiproc_and_plugin_args_win():
    plugin, args = plugin_settings(_parse("--nprocs", "4", "--mem-gb", "12.5"))
    assert plugin == "MultiProc" and args["n_procs"] == 4 and args["memory_gb"] == 12.5
    _, args = plugin_settings(_parse("--nprocs", "4", "--mem-gb", "12.5",
                                     "--plugin-args", '{"memory_gb": 3}'))
    assert args["memory_gb"] == 3
    _, args = plugin_settings(_parse("--nprocs", "4"))
    assert "memory_gb" not in args  # absent flag: MultiProc measures the machine, as before
    plugin, args = plugin_settings(_parse("--nprocs", "1", "--mem-gb", "2"))
    assert plugin == "Linear" and args == {}


@pytest.mark.parametrize(("plugin_args", "expected"), [("{n_procs: 2", "not valid JSON"),
                                                       ("[2]", "must be a JSON object")])
def test_bad_plugin_args_are_refused_before_the_output_folder_is_touched(bids, tmp_path, capsys,
                                                                         plugin_args, expected):
    out = tmp_path / "out"
    assert main([str(bids), str(out), "group", "--plugin-args", plugin_args, "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("extra", "threads"), [([], 3), (["--omp-nthreads", "2"], 2)])
def test_omp_nthreads_sets_the_torch_threads_of_training_and_scoring(bids, tmp_path, extra, threads):
    opts = build_parser().parse_args([str(bids), str(tmp_path / "out"), "group", "--nprocs", "3", *extra])
    wf = group_workflow(opts, check_inputs(opts, ["group"]))
    for name in ("train_model", "score_all"):
        node = wf.get_node(name)
        assert (node.n_procs, node.inputs.num_threads) == (threads, threads), name
    assert plugin_settings(opts)[1]["n_procs"] == 3  # MultiProc still runs 3 processes


def test_more_threads_per_process_than_cores_is_warned_about(bids, tmp_path, capsys):
    opts = build_parser().parse_args([str(bids), str(tmp_path / "out"), "group", "--nprocs", "2",
                                      "--omp-nthreads", "4", "--quiet"])
    check_inputs(opts, ["group"])
    err = capsys.readouterr().err
    assert "--omp-nthreads 4 is more than the 2 CPU cores of --nprocs" in err


def _failing_workflow(marker: Path):
    """Two steps that fail with user errors and one independent step that writes ``marker``."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    def fail(label):
        from normdiff_bids.errors import InputError

        raise InputError(f"sub-{label}: stats/aseg.stats is missing")

    def touch(path):
        from pathlib import Path

        Path(path).write_text("ran")
        return path

    wf = pe.Workflow(name="several_wf")
    for label in ("01", "02"):
        node = pe.Node(Function(input_names=["label"], output_names=["out"], function=fail),
                       name=f"read_{label}")
        node.inputs.label = label
        wf.add_nodes([node])
    ok = pe.Node(Function(input_names=["path"], output_names=["out"], function=touch), name="write")
    ok.inputs.path = str(marker)
    wf.add_nodes([ok])
    return wf


def _opts(**values):
    return SimpleNamespace(**{"verbose": 0, "nprocs": 1, "plugin": None, "plugin_args": None, **values})


def test_by_default_a_run_finishes_what_it_can_and_lists_every_failure(tmp_path):
    marker = tmp_path / "marker.txt"
    with pytest.raises(NodeError) as error:
        run_workflow(_failing_workflow(marker), _opts(), tmp_path / "work")
    message = str(error.value)
    assert message.startswith("2 processing steps failed")
    assert "  - read_01: sub-01: stats/aseg.stats is missing" in message
    assert "  - read_02: sub-02: stats/aseg.stats is missing" in message
    assert "--stop-on-first-crash" in message
    assert error.value.exit_code == 2  # both were input errors
    assert [f["node"] for f in error.value.failures] == ["read_01", "read_02"]
    assert all(Path(f["crash_file"]).is_file() for f in error.value.failures)
    assert marker.read_text() == "ran"  # the independent step still ran


def test_stop_on_first_crash_stops_at_the_first_failure(tmp_path):
    marker = tmp_path / "marker.txt"
    with pytest.raises(NodeError) as error:
        run_workflow(_failing_workflow(marker), _opts(stop_on_first_crash=True), tmp_path / "work")
    assert len(error.value.failures) == 1
    assert str(error.value) in {"sub-01: stats/aseg.stats is missing", "sub-02: stats/aseg.stats is missing"}


def test_the_options_reach_nipype(tmp_path, monkeypatch):
    from nipype.pipeline import engine as pe

    seen = {}

    def fake_run(self, plugin=None, plugin_args=None, updatehash=False):
        seen.update(plugin=plugin, plugin_args=plugin_args,
                    stop=self.config["execution"]["stop_on_first_crash"])

    monkeypatch.setattr(pe.Workflow, "run", fake_run)
    wf = pe.Workflow(name="empty_wf")
    run_workflow(wf, _opts(nprocs=2, mem_gb=6.0), tmp_path)
    assert seen["plugin"] == "MultiProc" and seen["plugin_args"]["memory_gb"] == 6.0
    assert seen["stop"] is False
    run_workflow(wf, _opts(nprocs=2, stop_on_first_crash=True), tmp_path)
    assert seen["stop"] is True and "memory_gb" not in seen["plugin_args"]


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path):
    from normdiff_bids.cli.parser import parse_args

    config = tmp_path / "normdiff.toml"
    config.write_text('n-samples = 300\nidp_set = ["aseg", "global"]\nquiet = true\n'
                      'unknown-site = "marginal"\ncondition-on = "EstimatedTotalIntraCranialVol"\n')
    opts = parse_args(["in", "out", "group", "--config-file", str(config), "--n-samples", "500"])
    assert opts.n_samples == 500 and opts.idp_set == ["aseg", "global"] and opts.quiet
    assert opts.unknown_site == "marginal" and opts.condition_on == ["EstimatedTotalIntraCranialVol"]
    assert parse_args(["in", "out", "group"]).n_samples is None  # no file, no change


def test_covariates_repeat_on_the_command_line_and_replace_the_config_files(tmp_path):
    from normdiff_bids.cli.parser import parse_args

    config = tmp_path / "normdiff.toml"
    config.write_text('covariate = ["tiv", "scanner:categorical"]\n')
    assert parse_args(["in", "out", "group", "--config-file", str(config)]).covariate == \
        ["tiv", "scanner:categorical"]
    given = ["in", "out", "group", "--config-file", str(config), "--covariate", "a", "--covariate", "b", "c"]
    assert parse_args(given).covariate == ["a", "b", "c"]
    assert parse_args(["in", "out", "group"]).covariate == []


@pytest.mark.parametrize("text, expected", [
    ("n-sampels = 300\n", "'n-sampels' is not an option; did you mean 'n-samples'?"),
    ("n-samples = 'many'\n", "n-samples = 'many': 'many' is not a whole number"),
    ("quiet = 'yes'\n", "quiet = 'yes': use true or false"),
    ("unknown-site = 'guess'\n", "choose from error, marginal"),
    ("n-samples = \n", "is not valid TOML"),
    ("covariate = ['tiv:numeric']\n", "'numeric' is not a kind"),
])
def test_bad_config_files_are_refused_by_key(capsys, tmp_path, text, expected):
    from normdiff_bids.cli.run import main

    config = tmp_path / "normdiff.toml"
    config.write_text(text)
    assert main([str(tmp_path), str(tmp_path / "out"), "group", "--config-file", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(config) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
