"""The mmq command line: local embed/classify print JSON; bad input exits 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from producer.cli import mmq as cli


@pytest.fixture(autouse=True)
def _share_loaded_model(monkeypatch, model):
    # Loading the weights once per test session keeps these tests fast; the
    # console-script test below loads them for real in a fresh process.
    monkeypatch.setattr(cli, "_load", lambda args: model)


def test_embed_prints_json_equal_to_the_model(capsys, model):
    assert cli.main(["embed", "--modality", "text", "hello there", "second one"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dim"] == 384 and out["model"] == model.version
    emb = torch.tensor([r["embedding"] for r in out["results"]])
    assert (emb - model.embed("text", ["hello there", "second one"])).abs().max() < 1e-6
    assert [r["truncated"] for r in out["results"]] == [False, False]


def test_classify_prints_labels(capsys):
    assert cli.main(["classify", "--labels", "sport,finance,weather", "--top-k", "2",
                     "the bank cut interest rates"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["labels"][0][0] == "finance" and len(res["labels"]) == 2


def test_reads_stdin_when_no_inputs(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("first line\n\nsecond line\n"))
    assert cli.main(["embed"]) == 0
    assert [r["input"] for r in json.loads(capsys.readouterr().out)["results"]] == [
        "first line", "second line"]


def test_bad_input_exits_2_with_a_readable_message(capsys):
    assert cli.main(["classify", "--labels", "a,b", "fine", "   "]) == 2
    err = json.loads(capsys.readouterr().err)
    assert err["error"] == "invalid_input" and "item 1" in err["message"]


def test_demo_prints_a_table(capsys):
    assert cli.main(["demo-local"]) == 0
    out = capsys.readouterr().out
    assert "weather" in out and "Heavy rain" in out


def test_console_script_runs_in_a_fresh_process():
    exe = shutil.which("mmq", path=str(Path(sys.executable).parent))
    assert exe, "the mmq console script is installed beside this interpreter"
    r = subprocess.run([exe, "classify", "--labels", "animals,finance", "a dog barked"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["labels"][0][0] == "animals"
