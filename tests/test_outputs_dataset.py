"""The output folder: dataset_description, refusal of unsafe folders, and parallel jobs sharing one folder."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from outputs_helpers import write_worker

from normdiff_bids import __version__
from normdiff_bids.errors import OutputError
from normdiff_bids.outputs import names
from normdiff_bids.outputs.dataset import (
    BIDSIGNORE_PATTERNS,
    bids_uri,
    check_output_dir,
    generated_by,
    prepare_output_dir,
)
from normdiff_bids.outputs.regions import MAP_MEASURES
from normdiff_bids.outputs.tables import read_group_table


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bids_dir(tmp_path):
    raw = tmp_path / "bids"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps(
        {"Name": "raw", "BIDSVersion": "1.10.0", "DatasetDOI": "10.1234/abcd", "DatasetVersion": "2.0"}))
    return raw


def test_description_names_the_pipeline_and_its_source(tmp_path, bids_dir):
    out = prepare_output_dir(tmp_path / "deriv", bids_dir, environ={})
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"] == [{"Name": "normdiff-bids", "Version": __version__,
                                    "Description": desc["GeneratedBy"][0]["Description"]}]
    assert desc["SourceDatasets"] == [{"URL": bids_dir.resolve().as_uri(), "DOI": "doi:10.1234/abcd",
                                       "Version": "2.0"}]
    assert desc["DatasetLinks"]["raw"] == bids_dir.resolve().as_uri()
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert ignore == list(BIDSIGNORE_PATTERNS)
    assert (out / "README.md").read_text().startswith("# normdiff-bids derivatives")


def test_an_output_inside_the_dataset_links_it_by_relative_paths(tmp_path, bids_dir):
    fs = bids_dir / "derivatives" / "freesurfer"
    fs.mkdir(parents=True)
    elsewhere = tmp_path / "fs-elsewhere"
    elsewhere.mkdir()
    out = prepare_output_dir(bids_dir / "derivatives" / "normdiff", bids_dir, fs_dir=fs, environ={})
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": "../..", "freesurfer": "../freesurfer"}
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:", "DOI": "doi:10.1234/abcd", "Version": "2.0"}]
    assert (out / desc["DatasetLinks"]["raw"]).resolve() == bids_dir.resolve()
    aparc = fs / "sub-01" / "mri" / "aparc+aseg.mgz"
    assert bids_uri(out, aparc) == "bids:freesurfer:sub-01/mri/aparc+aseg.mgz"
    assert bids_uri(out, bids_dir / "participants.tsv") == "bids:raw:participants.tsv"
    assert bids_uri(out, elsewhere / "x.mgz") == (elsewhere / "x.mgz").resolve().as_uri()
    # a FreeSurfer folder outside the dataset does not move with it: an absolute link
    other = prepare_output_dir(bids_dir / "derivatives" / "other", bids_dir, fs_dir=elsewhere, environ={})
    links = json.loads((other / "dataset_description.json").read_text())["DatasetLinks"]
    assert links == {"raw": "../..", "freesurfer": elsewhere.resolve().as_uri()}


def test_an_absolute_link_of_an_earlier_run_takes_the_relative_spelling(bids_dir):
    out = bids_dir / "derivatives" / "normdiff"
    out.mkdir(parents=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "normdiff-bids normative deviations", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "normdiff-bids", "Version": __version__}],
        "SourceDatasets": [{"URL": bids_dir.resolve().as_uri(), "DOI": "doi:10.1234/abcd"}],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri(), "atlas": "https://example.org/atlas"}}))
    prepare_output_dir(out, bids_dir, environ={})
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": "../..", "atlas": "https://example.org/atlas"}
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:", "DOI": "doi:10.1234/abcd", "Version": "2.0"}]


def test_a_link_of_the_same_name_to_another_dataset_is_kept_and_the_source_follows(tmp_path, bids_dir):
    out = bids_dir / "derivatives" / "normdiff"
    out.mkdir(parents=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "n", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "normdiff-bids", "Version": __version__}],
        "DatasetLinks": {"raw": (tmp_path / "another").as_uri()}}))
    prepare_output_dir(out, bids_dir, environ={})
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": (tmp_path / "another").as_uri(), "raw2": "../.."}
    assert desc["SourceDatasets"][0]["URL"] == "bids:raw2:"


def test_descriptions_tsv_lists_every_desc_label_and_keeps_other_rows(tmp_path, bids_dir):
    assert set(names.DESCRIPTIONS) == {names.SCORES_DESC, *MAP_MEASURES}  # every label the names use
    out = prepare_output_dir(tmp_path / "deriv", bids_dir, environ={})
    lines = (out / "descriptions.tsv").read_text().splitlines()
    assert lines[0] == "desc_id\tdescription"
    rows = dict(line.split("\t") for line in lines[1:])
    assert set(rows) == {f"desc-{label}" for label in names.DESCRIPTIONS}
    assert all(len(text) > 40 for text in rows.values())
    sidecar = json.loads((out / "descriptions.json").read_text())
    assert {"Description", "desc_id", "description"} <= set(sidecar)
    with open(out / "descriptions.tsv", "a") as fh:
        fh.write("desc-mine\tsomething a user added\n")
    prepare_output_dir(out, bids_dir, environ={})
    assert (out / "descriptions.tsv").read_text().splitlines()[-1] == "desc-mine\tsomething a user added"


def test_container_is_recorded_when_the_environment_says_so():
    entry = generated_by({"NORMDIFF_CONTAINER_TYPE": "docker", "NORMDIFF_CONTAINER_TAG": "normdiff/bids:0.1"})
    assert entry["Container"] == {"Type": "docker", "Tag": "normdiff/bids:0.1"}
    assert generated_by({"APPTAINER_NAME": "normdiff.sif"})["Container"] == {"Type": "apptainer",
                                                                             "Tag": "normdiff.sif"}
    assert "Container" not in generated_by({})


def test_preparing_twice_changes_nothing_and_keeps_user_additions(tmp_path, bids_dir):
    out = prepare_output_dir(tmp_path / "deriv", bids_dir, environ={})
    with open(out / ".bidsignore", "a") as fh:
        fh.write("extra/\n")
    before = _snapshot(out)
    prepare_output_dir(out, bids_dir, environ={})
    assert _snapshot(out) == before


def test_a_new_version_is_added_to_generated_by_not_swapped_in(tmp_path, bids_dir):
    out = prepare_output_dir(tmp_path / "deriv", bids_dir, environ={})
    path = out / "dataset_description.json"
    desc = json.loads(path.read_text())
    desc["GeneratedBy"][0]["Version"] = "0.0.1"
    path.write_text(json.dumps(desc))
    prepare_output_dir(out, bids_dir, environ={})
    versions = [g["Version"] for g in json.loads(path.read_text())["GeneratedBy"]]
    assert versions == ["0.0.1", __version__]


def test_another_pipelines_dataset_is_refused_and_left_untouched(tmp_path, bids_dir):
    foreign = tmp_path / "fmriprep"
    foreign.mkdir()
    (foreign / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep outputs", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.0"}]}))
    (foreign / "sub-01.html").write_text("<html></html>")
    before = _snapshot(foreign)
    with pytest.raises(OutputError, match="'fMRIPrep', not 'normdiff-bids'.*refusing"):
        prepare_output_dir(foreign, bids_dir)
    assert _snapshot(foreign) == before
    assert sorted(p.name for p in foreign.iterdir()) == ["dataset_description.json", "sub-01.html"]


@pytest.mark.parametrize("content, match", [
    ('{"Name": "raw", "BIDSVersion": "1.10.0"}', "raw BIDS dataset"),
    ('{"Name": "old", "DatasetType": "derivative", "PipelineDescription": {"Name": "FreeSurfer"}}',
     "'FreeSurfer'"),
    ("{not json", "not a readable JSON"),
])
def test_raw_legacy_and_broken_descriptions_are_refused(tmp_path, content, match):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "dataset_description.json").write_text(content)
    with pytest.raises(OutputError, match=match):
        check_output_dir(folder)


def test_the_input_dataset_itself_is_refused(bids_dir):
    with pytest.raises(OutputError, match="is the input BIDS dataset"):
        prepare_output_dir(bids_dir, bids_dir)


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        prepare_output_dir(target)


_READ_ONLY_PROBE = """
import sys
from normdiff_bids.errors import OutputError
from normdiff_bids.outputs.dataset import prepare_output_dir
try:
    prepare_output_dir(sys.argv[1])
except OutputError as err:
    print("REFUSED:", err)
"""


def _unprivileged_python() -> tuple[str, dict]:
    """An interpreter and user to run the read-only check with: as root, file modes do not stop writes."""
    if os.geteuid() != 0:
        return sys.executable, {}
    # The output-folder checks need only the standard library, so any Python >= 3.11 the user
    # "nobody" can execute will do (the project's virtual environment may sit in root's home).
    nobody = {"user": 65534, "group": 65534}
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin")):
        try:
            check = subprocess.run([candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                                   capture_output=True, timeout=30, **nobody)
        except (OSError, TypeError):
            continue
        if check.returncode == 0:
            return candidate, nobody
    pytest.skip("no Python interpreter that an unprivileged user can run")


def test_a_read_only_folder_is_refused_before_anything_is_written():
    python, user = _unprivileged_python()
    root = Path(tempfile.mkdtemp(prefix="normdiff-ro-"))
    try:
        folder = root / "deriv"
        folder.mkdir()
        (folder / "keep.txt").write_text("unchanged")
        os.chmod(folder, 0o555)
        os.chmod(root, 0o755)
        env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HOME": str(root),
               "PATH": "/usr/bin:/bin"}
        done = subprocess.run([python, "-c", _READ_ONLY_PROBE, str(folder)], capture_output=True,
                              text=True, timeout=60, env=env, **user)
        assert "REFUSED:" in done.stdout, done.stdout + done.stderr
        assert "not writable" in done.stdout and str(folder) in done.stdout
        assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    finally:
        os.chmod(root / "deriv", 0o755)
        shutil.rmtree(root)


def test_an_unwritable_parent_is_named_in_the_refusal(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=f"parent folder of {tmp_path / 'a' / 'b'}.*not writable"):
        prepare_output_dir(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_parallel_jobs_share_one_output_folder_and_lose_nothing(tmp_path, bids_dir):
    out = tmp_path / "deriv"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    rounds = 8
    jobs = [ctx.Process(target=write_worker, args=(out, bids_dir, p, barrier, rounds)) for p in ("A", "B")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0]

    desc = json.loads((out / "dataset_description.json").read_text())
    assert [g["Name"] for g in desc["GeneratedBy"]] == ["normdiff-bids"]
    assert len(desc["SourceDatasets"]) == 1
    assert (out / ".bidsignore").read_text().splitlines() == list(BIDSIGNORE_PATTERNS)
    subjects = [f"sub-{p}{r:02d}" for p in ("A", "B") for r in range(rounds)]
    group = read_group_table(out)
    assert sorted(zip(group.participant_id, group.session_id)) == sorted(
        (s, ses) for s in subjects for ses in ("ses-1", "ses-2"))
    for sub in subjects:
        for ses in ("ses-1", "ses-2"):
            name = f"{sub}/{ses}/anat/{sub}_{ses}_desc-deviations_scores.tsv"
            assert (out / name).is_file()
    leftovers = [p.name for p in out.rglob(".*") if p.name not in (".bidsignore", ".normdiff.lock")]
    assert leftovers == []


def test_the_output_lock_is_reentrant_in_a_thread_and_shuts_out_other_threads(tmp_path):
    import threading
    import time

    from normdiff_bids.outputs.dataset import output_lock

    events = []
    holding = threading.Event()

    def other_thread():
        holding.wait(timeout=30)
        with output_lock(tmp_path, timeout=30):
            events.append("other thread in")

    thread = threading.Thread(target=other_thread)
    thread.start()
    with output_lock(tmp_path):
        with output_lock(tmp_path, timeout=1):  # the holder takes it again without waiting on itself
            holding.set()
            time.sleep(0.5)  # the other thread waits on the lock meanwhile
            events.append("holder done")
    thread.join(timeout=30)
    assert events == ["holder done", "other thread in"]


_LOCK_HOLDER = """
import sys
from normdiff_bids.outputs.dataset import output_lock
with output_lock(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_a_lock_held_by_another_process_times_out_naming_the_lock_file(tmp_path):
    from normdiff_bids.outputs.dataset import LOCK_NAME, output_lock

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(OutputError) as refused:
            with output_lock(tmp_path, timeout=0.3):
                pytest.fail("the lock was taken while another process held it")
        message = str(refused.value)
        assert str(tmp_path / LOCK_NAME) in message
        assert "another normdiff-bids run" in message and "wait" in message and "stale lock" in message
    finally:
        holder.communicate("done\n", timeout=30)
    with output_lock(tmp_path, timeout=5):  # released with its holder
        pass
    assert holder.returncode == 0
    if os.name == "posix":  # the lock file stays, so that every waiting job locks the same file
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
