"""`mmlens merge` and shards: a killed merge is redone in place, mixed code or hand-edited rows
are refused, an empty shard is named as such, shards with and without word maps merge and
run.json says which."""

import json

import pytest

from mmlens.cli import main
from mmlens.experiments.report import page as report
from mmlens.experiments.report.word_picker import NOT_COMPUTED
from mmlens.experiments.runfolder import fingerprint
from mmlens.experiments.tables import check_run_folder
from mmlens.zoo import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="shapes-llava is not bundled here")
ARGS = ["flow", "--per-task", "1", "--tasks", "ChooseAttr,QueryAttr", "--quiet"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folders = [tmp_path_factory.mktemp(f"shard-{k}") for k in range(2)]
    for k, folder in enumerate(folders):
        assert main([*ARGS, "--shard", f"{k}/2", "--out", str(folder)]) == 0
    return folders


def test_a_killed_merge_is_redone_in_the_same_folder(shards, tmp_path, monkeypatch):
    out = tmp_path / "merged"

    def killed(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "build_report", killed)
    assert main(["merge", str(out), *map(str, shards)]) == 130  # stopped after the store
    monkeypatch.undo()
    assert (out / "flow.jsonl").is_file() and not (out / ".mmlens.lock").exists()
    assert main(["merge", str(out), *map(str, shards)]) == 0
    summary = check_run_folder(out)
    assert summary["n_examples"] == 2 and (out / "report.html").is_file()
    assert summary["mmlens_source"] == fingerprint.source_digest()  # the code, in run.json
    assert summary["versions"]["mmlens"] == fingerprint.version_of("mmlens")
    assert summary["word_maps"] is True and "word_maps_per_shard" not in summary


def test_a_folder_holding_a_run_is_not_merged_into(shards, capsys):
    assert main(["merge", str(shards[0]), *map(str, shards)]) == 2
    assert "already holds a run: merge into a new folder" in capsys.readouterr().err


def test_shards_of_other_mmlens_code_are_not_merged(shards, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other-code"
    monkeypatch.setattr(fingerprint, "source_digest", lambda *args: "0123456789abcdef")
    assert main([*ARGS, "--shard", "1/2", "--out", str(other)]) == 0
    assert main(["merge", str(tmp_path / "mixed"), str(shards[0]), str(other)]) == 2
    assert "shards of different studies (they differ in mmlens.source)" in capsys.readouterr().err


def test_a_hand_edited_row_in_a_shard_is_refused(shards, tmp_path, capsys):
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in shards[1].iterdir():
        if path.is_file():
            (edited / path.name).write_bytes(path.read_bytes())
    lines = (edited / "flow.jsonl").read_text().splitlines(keepends=True)
    record = json.loads(lines[1])
    lines[1] = lines[1].replace(f'"p_base":{json.dumps(record["p_base"])}', '"p_base":0.5', 1)
    (edited / "flow.jsonl").write_text("".join(lines))
    assert main(["merge", str(tmp_path / "merged"), str(shards[0]), str(edited)]) == 2
    err = capsys.readouterr().err
    assert f"{edited / 'flow.jsonl'} line 2 is damaged (check mismatch: edited by hand" in err


def test_an_empty_shard_is_named_as_such(tmp_path, capsys):
    assert main([*ARGS, "--shard", "5/6", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "shard 5/6 is empty: the 2 examples fill only shards 0 to 1" in err
    assert "flows" not in err


def test_shards_with_and_without_word_maps_merge_as_mixed(shards, tmp_path):
    """The maps change no row: the merge keeps each view as its shard made it, and run.json and
    the report say the maps are mixed, shard by shard."""
    bare = tmp_path / "no-maps"
    assert main([*ARGS, "--shard", "1/2", "--no-word-maps", "--out", str(bare)]) == 0
    out = tmp_path / "merged"
    assert main(["merge", str(out), str(shards[0]), str(bare)]) == 0
    summary = check_run_folder(out)
    assert summary["word_maps"] == "mixed" and summary["word_maps_per_shard"] == [True, False]
    assert summary["arguments"]["word_maps"] == "mixed"
    views = json.loads((out / "views.json").read_text())
    shard_views = [json.loads((folder / "views.json").read_text())[0]
                   for folder in (shards[0], bare)]
    assert sorted(views, key=lambda v: v["example_id"]) == sorted(
        shard_views, key=lambda v: v["example_id"])
    assert [("word_maps" in v, bool(v.get("word_maps_skipped"))) for v in shard_views] == [
        (True, False), (False, True)]
    page = (out / "report.html").read_text()
    assert "computed by some shards only" in page
    assert NOT_COMPUTED.replace("'", "&#x27;") in page
