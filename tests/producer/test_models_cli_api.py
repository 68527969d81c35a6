"""`mmq models`, `mmq submit --model-version`, GET /v1/models and the API's
model_version field, on a SQLite store (no workers: nothing here runs a job)."""

import json

import pytest
from fastapi.testclient import TestClient

from core.config import Settings, get_settings
from core.model.adapters import Adapter, AdapterConfig, save_adapter
from core.store import versions
from producer import cli
from producer.api import create_app
from producer.sdk import Client

KEY = "models-test-key"


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("MMQ_DATABASE_URL", f"sqlite:///{tmp_path / 'mmq.db'}")
    monkeypatch.setenv("MMQ_ADAPTERS_DIR", str(tmp_path / "adapters"))
    monkeypatch.setenv("MMQ_BROKER_URL", "redis://127.0.0.1:1/0")  # never reached here
    get_settings.cache_clear()
    c = Client()
    for name, modality in (("img-a", "image"), ("img-b", "image"), ("txt-a", "text")):
        a = Adapter(AdapterConfig(modality=modality, feature="embedding", in_dim=8, dim=8))
        path, sha = save_adapter(a, tmp_path / "adapters", name)
        with c.sessions.begin() as s:
            versions.create_version(session=s, name=name, modality=modality, base_model="b",
                                    data_digest="d", metrics={"accuracy": 0.5}, config={},
                                    adapter_file=path.name, adapter_sha256=sha)
    yield c
    c.close()
    get_settings.cache_clear()


def test_models_commands(client, capsys, tmp_path):
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "img-a" in out and "candidate" in out and "txt-a" in out
    assert cli.main(["models", "promote", "img-a"]) == 0
    assert cli.main(["models", "promote", "img-b"]) == 0
    capsys.readouterr()
    assert cli.main(["models", "list", "--json", "--modality", "image"]) == 0
    rows = {r["name"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {"img-a": "retired", "img-b": "promoted"}
    assert cli.main(["models", "rollback", "image"]) == 0
    assert "now run img-a" in capsys.readouterr().out
    assert cli.main(["models", "rm", "img-a"]) == 1  # promoted again: kept
    assert "promoted" in capsys.readouterr().err
    assert cli.main(["models", "rm", "img-b"]) == 0
    assert not list((tmp_path / "adapters").glob("img-b-*"))  # its file went with it
    assert cli.main(["models", "show", "img-b"]) == 3
    capsys.readouterr()
    assert cli.main(["models", "show", "img-a"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "promoted"


def test_submit_checks_the_version(client, capsys):
    assert cli.main(["submit", "text", "hello", "--model-version", "nope"]) == 2
    assert "model_version 'nope' does not exist" in capsys.readouterr().err
    assert cli.main(["submit", "text", "hello", "--model-version", "img-a"]) == 2
    assert "is for image jobs, not text" in capsys.readouterr().err
    rows = client.validate([{"modality": "text", "input": "hi", "model_version": "txt-a"},
                            {"modality": "text", "input": "hi", "model_version": "base"}])
    assert [r["model_version"] for r in rows] == ["txt-a", "base"]


def test_api_lists_models_and_checks_model_version(client):
    settings = Settings(database_url=client.settings.database_url, api_keys=KEY,
                        broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings, client)) as http:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert http.get("/v1/models").status_code == 401
        client.promote("txt-a")
        body = http.get("/v1/models", headers=auth).json()
        assert body["serving"] == {"text": "txt-a", "image": "base", "audio": "base"}
        assert {v["name"] for v in body["versions"]} == {"img-a", "img-b", "txt-a"}
        one = http.get("/v1/models?modality=image", headers=auth).json()
        assert one["serving"] == {"image": "base"} and len(one["versions"]) == 2
        assert http.get("/v1/models/txt-a", headers=auth).json()["status"] == "promoted"
        assert http.get("/v1/models/nope", headers=auth).status_code == 404
        r = http.post("/v1/jobs", headers=auth, json={"modality": "text", "text": "hi",
                                                      "model_version": "nope"})
        assert r.status_code == 422 and "does not exist" in r.json()["error"]["message"]


def test_models_retrieve_answers_every_name_the_list_shows(client):
    """OpenAI's client listed "default" and "base" (models.list()), but
    models.retrieve("default") was a 404 'no model version'."""
    import openai

    settings = Settings(database_url=client.settings.database_url, api_keys=KEY,
                        broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings, client)) as http:
        auth = {"Authorization": f"Bearer {KEY}"}
        listed = http.get("/v1/models", headers=auth).json()["data"]
        assert [c["id"] for c in listed][:2] == ["default", "base"] and len(listed) == 5
        for card in listed:
            r = http.get(f"/v1/models/{card['id']}", headers=auth)
            assert r.status_code == 200, r.text
            assert {k: r.json().get(k) for k in card} == card  # the same object
        assert http.get("/v1/models/txt-a", headers=auth).json()["base_model"] == "b"
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http,
                            max_retries=0)
        assert [m.id for m in oai.models.list()] == [c["id"] for c in listed]
        assert oai.models.retrieve("default").id == "default"
        assert oai.models.retrieve("img-a").owned_by == "mmq"
        with pytest.raises(openai.NotFoundError, match="no model version 'nope'"):
            oai.models.retrieve("nope")


def test_train_refuses_bad_data_before_loading_a_model(client, capsys, tmp_path, monkeypatch):
    from core.model.multimodal import MultimodalModel

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded for data that cannot train")

    monkeypatch.setattr(MultimodalModel, "load", no_model)
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "data" / "cats" / "a.txt").write_text("x")
    (tmp_path / "data" / "dogs").mkdir()
    assert cli.main(["train", "text", "--data", str(tmp_path / "data"), "--name", "v"]) == 2
    assert "class 'dogs'" in capsys.readouterr().err
    assert cli.main(["train", "text", "--data", str(tmp_path / "nope"), "--name", "v"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["train", "text", "--data", str(tmp_path / "data"), "--name", "base"]) == 2
    assert "reserved" in capsys.readouterr().err


def test_train_refuses_files_outside_its_folder_before_loading_a_model(client, capsys,
                                                                       tmp_path, monkeypatch):
    """labels.csv rows like /etc/hostname were trained on."""
    from core.model.multimodal import MultimodalModel

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded for data that cannot train")

    monkeypatch.setattr(MultimodalModel, "load", no_model)
    data = tmp_path / "data"
    (data / "f").mkdir(parents=True)
    for i in range(3):
        (data / "f" / f"{i}.txt").write_text(f"text {i}")
    (data / "labels.csv").write_text("f/0.txt,a\nf/1.txt,a\nf/2.txt,b\n/etc/hostname,b\n")
    assert cli.main(["train", "text", "--data", str(data), "--name", "v"]) == 2
    err = capsys.readouterr().err
    assert "/etc/hostname: outside the data folder" in err


def test_train_promotes_only_a_version_that_beats_its_base(client, capsys, tmp_path):
    """The keyword version lost 19 points to its base and nothing said so."""
    from tests.helpers import FINANCE, SPORT, write_labelled

    # Plain topic names: the base already gets every held-out sentence right.
    write_labelled(tmp_path / "plain", {"sport": SPORT, "finance": FINANCE})
    args = ["--held-out", "0.34", "--max-epochs", "10", "--patience", "10", "-q", "--promote"]
    assert cli.main(["train", "text", "--data", str(tmp_path / "plain"), "--name", "plain",
                     *args]) == 0
    out = capsys.readouterr().out
    assert "not promoted: plain does not beat its base" in out and "does NOT beat" in out
    assert client.model("plain")["status"] == "candidate"
    # Names the base cannot know: the version learns them and is promoted.
    write_labelled(tmp_path / "new", {"alpha": SPORT, "omega": FINANCE})
    assert cli.main(["train", "text", "--data", str(tmp_path / "new"), "--name", "new",
                     "--seed", "3", *args]) == 0
    out = capsys.readouterr().out
    assert "the version beats its base" in out and "not promoted" not in out
    assert client.model("new")["status"] == "promoted"
    assert cli.main(["models", "list", "--modality", "text"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:]]
    shown = {r[0]: (r[3], r[4]) for r in rows}
    assert shown["new"][0] > shown["new"][1] and shown["plain"][0] <= shown["plain"][1]
    assert cli.main(["models", "show", "plain"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["base_accuracy"] == v["metrics"]["base_accuracy"] == 1.0
    assert set(v["metrics"]["base_per_class"]) == {"sport", "finance"}
