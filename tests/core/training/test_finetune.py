"""Fine-tuning: data checks before training, an adapter trained on a tiny text set,
its weights checked by sha256, versions of one batch kept apart in the batcher."""

import json
import re
import unicodedata

import pytest
import torch

from core.model.adapters import (
    Adapter,
    AdapterCache,
    AdapterConfig,
    AdapterMismatch,
    load_adapter,
    save_adapter,
)
from core.serving.batcher import BatcherConfig, DynamicBatcher
from core.serving.contracts import AdapterRef
from core.training.finetune import FinetuneConfig, fit_dir
from core.training.labelled import DataError, read_contents, read_labelled
from tests.helpers import FINANCE, SPORT, write_labelled

# -- the data, checked before training ----------------------------------------------------

def test_bad_data_is_refused_with_a_clear_error(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.txt").write_text("x")
    (tmp_path / "only" / "b.txt").write_text("y")
    with pytest.raises(DataError, match="only one class"):
        read_labelled(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="class 'empty' .* has no files"):
        read_labelled(tmp_path)
    (tmp_path / "empty" / "c.txt").write_text("z")
    with pytest.raises(DataError, match="class 'empty' has 1 file"):
        read_labelled(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        read_labelled(tmp_path / "nope")


def test_unreadable_files_are_named(tmp_path, model):
    write_labelled(tmp_path, {"a": ["one", "two"], "b": ["three", "four"]})
    (tmp_path / "b" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    data = read_labelled(tmp_path)
    with pytest.raises(DataError, match=r"b/bad.txt: not UTF-8"):
        read_contents(data, "text")
    img = tmp_path / "img"
    write_labelled(img, {"a": ["x", "y"], "b": ["z", "w"]})  # text files are no images
    data = read_labelled(img)
    from core.training.labelled import prepare_all
    with pytest.raises(DataError, match=r"img/a/0.txt"):
        prepare_all(model, "image", data, read_contents(data, "image"))


def test_index_files(tmp_path):
    write_labelled(tmp_path, {"files": ["one", "two", "three"]})
    (tmp_path / "labels.csv").write_text("path,label\nfiles/0.txt,x\nfiles/1.txt,y\n"
                                         "files/2.txt,y\n")
    with pytest.raises(DataError, match="class 'x' has 1 file"):
        read_labelled(tmp_path)
    (tmp_path / "labels.csv").unlink()
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps({"path": f"files/{i}.txt",
                                                                 "label": "xy"[i % 2]})
                                                     for i in range(4)) + "\n")
    (tmp_path / "files" / "3.txt").write_text("four")
    data = read_labelled(tmp_path)
    assert data.names == ["x", "y"] and data.labels == [0, 1, 0, 1]
    (tmp_path / "labels.jsonl").write_text('{"path": "files/9.txt", "label": "x"}\n'
                                           '{"path": "files/0.txt", "label": "y"}\n' * 2)
    with pytest.raises(DataError, match="files/9.txt: cannot read"):
        read_contents(read_labelled(tmp_path), "text")


@pytest.mark.parametrize("index", ["labels.csv", "labels.jsonl"])
@pytest.mark.parametrize("escape", ["../../../../etc/passwd", "/etc/hostname",
                                    "files/../../outside.txt", "link.txt"])
def test_index_rows_outside_the_folder_are_refused(tmp_path, index, escape):
    """Rows naming a file outside --data were read and trained on."""
    data = tmp_path / "data"
    write_labelled(data, {"files": ["one", "two", "three"]})
    (tmp_path / "outside.txt").write_text("not yours")
    (data / "link.txt").symlink_to(tmp_path / "outside.txt")
    rows = [("files/0.txt", "x"), ("files/1.txt", "x"), ("files/2.txt", "y"), (escape, "y")]
    if index == "labels.csv":
        (data / index).write_text("".join(f"{p},{lb}\n" for p, lb in rows))
    else:
        (data / index).write_text("".join(json.dumps({"path": p, "label": lb}) + "\n"
                                          for p, lb in rows))
    with pytest.raises(DataError, match=f"{re.escape(escape)}: outside the data folder"):
        read_labelled(data)


def test_label_names_are_compared_after_nfc_normalisation(tmp_path):
    """"café" in NFC and in NFD (as macOS names folders) were two classes."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    write_labelled(tmp_path, {"files": ["one", "two", "three", "four"]})
    (tmp_path / "labels.csv").write_text(f"files/0.txt,{nfc}\nfiles/1.txt,{nfd}\n"
                                         "files/2.txt,tea\nfiles/3.txt,tea\n")
    data = read_labelled(tmp_path)
    assert data.names == [nfc, "tea"] and data.labels == [0, 0, 1, 1]
    folders = tmp_path / "folders"
    write_labelled(folders, {nfd: ["one", "two"], "tea": ["three", "four"]})
    assert read_labelled(folders).names == [nfc, "tea"]


def test_a_symlink_out_of_a_class_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    write_labelled(data, {"a": ["one", "two"], "b": ["three", "four"]})
    (tmp_path / "secret.txt").write_text("not yours")
    (data / "b" / "sneaky.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(DataError, match=r"b/sneaky.txt: outside the data folder"):
        read_labelled(data)
    (data / "b" / "sneaky.txt").unlink()
    (data / "c").symlink_to(tmp_path, target_is_directory=True)  # a whole class folder
    with pytest.raises(DataError, match=r"outside the data folder"):
        read_labelled(data)
    (data / "c").unlink()
    (data / "b" / "inside.txt").symlink_to(data / "a" / "0.txt")  # inside: fine
    assert len(read_labelled(data).paths) == 5


# -- training --------------------------------------------------------------------------

def test_an_adapter_learns_new_label_names(tmp_path, model):
    # Label names that mean nothing to the text tower: only training can teach them.
    write_labelled(tmp_path, {"alpha": SPORT, "omega": FINANCE})
    cfg = FinetuneConfig(held_out=0.34, val=0.0, max_epochs=60, patience=60, seed=3)
    data, digest, fitted = fit_dir(model, "text", tmp_path, cfg, progress=False)
    m = fitted.metrics
    assert data.names == ["alpha", "omega"] and len(digest) == 64
    # Four held-out sentences: the head (labels) beats the base, which cannot know the
    # names; the embedding MLP places all four nearest their label.
    assert m["accuracy"] > m["base_accuracy"] and m["embedding_accuracy"] == 1.0
    assert set(m["per_class"]) == set(m["base_per_class"]) == {"alpha", "omega"}
    assert m["n_held_out"] == 4 and m["n_train"] == 8
    again = fit_dir(model, "text", tmp_path, cfg, progress=False)[2]  # --seed reproduces
    for k, v in fitted.adapter.state_dict().items():
        assert torch.equal(v, again.adapter.state_dict()[k])
    # Still in the shared space: a sport sentence's adapted vector stays near its own
    # text embedding, and near the label it was taught.
    base = model.embed("text", ["the goalkeeper saved a penalty"])
    z = fitted.adapter(base, base)
    lab = model.embed("text", ["alpha", "omega"])
    assert float((z @ base.T).item()) > 0.5
    assert (z @ lab.T).argmax().item() == 0


def test_an_untrained_adapter_is_the_base_tower():
    cfg = AdapterConfig(modality="text", feature="embedding", in_dim=8, dim=8)
    base = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert torch.allclose(Adapter(cfg)(torch.randn(3, 8), base), base, atol=1e-6)


def test_adapter_weights_are_checked_by_sha256(tmp_path):
    cfg = AdapterConfig(modality="text", feature="embedding", in_dim=8, dim=8, labels=("a",))
    path, sha = save_adapter(Adapter(cfg), tmp_path, "v1")
    assert load_adapter(path, sha).cfg == cfg
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file, renamed
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterMismatch, match="does not match"):
        load_adapter(path, sha)
    ref = AdapterRef("v1", "text", str(path), sha)
    with pytest.raises(AdapterMismatch):
        AdapterCache(2).get(ref)


def test_one_batch_of_several_versions_keeps_each_jobs_output(tmp_path, fp32_model):
    # fp32, so that "the same output" can be exact: in bf16 a row's result moves with
    # its batch's shape (oneDNN's AMX kernels block by the number of rows).
    model = fp32_model
    dim = model.dim
    refs = []
    for i, name in enumerate(("va", "vb")):
        torch.manual_seed(i)
        a = Adapter(AdapterConfig(modality="text", feature="embedding", in_dim=dim, dim=dim))
        torch.nn.init.normal_(a.fc2.weight, std=0.2)
        path, sha = save_adapter(a, tmp_path, name)
        refs.append(AdapterRef(name, "text", str(path), sha))
    texts = ["a cat sat on the mat", "rates rose again", "the match ended in a draw"]
    batcher = DynamicBatcher(model, BatcherConfig(max_wait_ms=200), adapters=AdapterCache(4))
    try:
        mixed = [batcher.submit("text", model.prepare("text", t), labels=["sport", "finance"],
                                top_k=2, adapter=r)
                 for t in texts for r in (None, *refs)]
        alone = []
        for t in texts:
            for r in (None, *refs):
                alone.append(batcher.submit("text", model.prepare("text", t),
                                            labels=["sport", "finance"], top_k=2,
                                            adapter=r).result(timeout=60))
        for f, want in zip(mixed, alone, strict=True):
            got = f.result(timeout=60)
            assert torch.allclose(torch.tensor(got.embedding), torch.tensor(want.embedding),
                                  atol=1e-5)
            assert [lb for lb, _ in got.labels] == [lb for lb, _ in want.labels]
        plain = alone[0::3]
        for p, t in zip(plain, texts, strict=True):  # base jobs: the pretrained tower
            assert torch.allclose(torch.tensor(p.embedding), model.embed("text", [t])[0],
                                  atol=1e-5)
        assert not torch.allclose(torch.tensor(alone[1].embedding),
                                  torch.tensor(alone[2].embedding), atol=1e-3)
        assert len(batcher.adapters) == 2
    finally:
        batcher.stop()


def test_base_image_jobs_are_unaffected_by_a_version_in_the_same_batch(tmp_path, model):
    """The held-out photographs (core/training/photo_eval.py) score exactly as without
    versions when they share batches with an adapter's jobs; the features pass gives
    the same vectors as the plain forward."""
    from core.training import photo_eval as pe

    images, labels = [pe.photo_bytes(p, "JPEG") for p in pe.HELD_OUT], pe.labels_of(pe.HELD_OUT)
    kind, width = model.feature_kind("image")
    a = Adapter(AdapterConfig(modality="image", feature=kind, in_dim=width, dim=model.dim))
    torch.nn.init.normal_(a.fc2.weight, std=0.2)
    path, sha = save_adapter(a, tmp_path, "img")
    ref = AdapterRef("img", "image", str(path), sha)
    prepared = [model.prepare("image", x) for x in images]
    vecs, feats = model.forward_features("image", prepared[:4])
    assert feats.shape == (4, width)
    assert torch.allclose(vecs, model.forward("image", prepared[:4], unit=False), atol=1e-6)
    want = model.classify("image", images, labels=labels, top_k=1)
    b = DynamicBatcher(model, BatcherConfig(max_batch_size=32, max_wait_ms=200))
    try:
        futs = [b.submit("image", p, labels=labels, top_k=1, adapter=r)
                for p in prepared for r in (None, ref)]
        got = [f.result(timeout=120) for f in futs]
    finally:
        b.stop()
    base = got[0::2]
    assert [g.labels[0][0] for g in base] == [w[0][0] for w in want]
    assert max(abs(g.labels[0][1] - w[0][1]) for g, w in zip(base, want, strict=True)) < 1e-4


def test_a_failed_recording_leaves_no_version_and_no_file(tmp_path, model, monkeypatch):
    from core import store
    from core.store import versions
    from core.store.migrations import upgrade
    from core.training import finetune

    url = f"sqlite:///{tmp_path / 'mmq.db'}"
    upgrade(url)
    sessions = store.session_factory(store.make_engine(url))
    write_labelled(tmp_path / "data", {"alpha": SPORT, "omega": FINANCE})
    cfg = FinetuneConfig(held_out=0.34, val=0.0, max_epochs=3, patience=3)

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(versions, "create_version", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.train_version(model=model, modality="text", data_dir=tmp_path / "data",
                               name="v1", sessions=sessions, adapters_dir=tmp_path / "ad",
                               cfg=cfg, progress=False)
    assert not list((tmp_path / "ad").iterdir())  # the renamed file was removed again
    monkeypatch.undo()
    v = finetune.train_version(model=model, modality="text", data_dir=tmp_path / "data",
                               name="v1", sessions=sessions, adapters_dir=tmp_path / "ad",
                               cfg=cfg, progress=False)
    assert v["status"] == "candidate" and len(list((tmp_path / "ad").iterdir())) == 1
    with pytest.raises(versions.VersionError, match="exists already"):
        finetune.train_version(model=model, modality="text", data_dir=tmp_path / "data",
                               name="v1", sessions=sessions, adapters_dir=tmp_path / "ad",
                               cfg=cfg, progress=False)
