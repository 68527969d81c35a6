"""Model versions in the store, on SQLite and PostgreSQL: record, promote, roll back,
remove, and the resolution of a job's version in the UPDATE that starts it."""

import pytest

from core import store
from core.errors import InvalidInput
from core.store import versions


def _add(s, name: str, modality: str = "image"):
    return versions.create_version(
        session=s, name=name, modality=modality, base_model="base@1", data_digest="d" * 64,
        metrics={"accuracy": 0.9}, config={}, adapter_file=f"{name}.safetensors",
        adapter_sha256="a" * 64)


def _status(sessions, *names):  # noqa: F811
    with sessions() as s:
        return [versions.get_version(session=s, name=n).status for n in names]


def test_promote_retires_the_previous_and_rollback_walks_back(sessions):  # noqa: F811
    with sessions.begin() as s:
        for n in ("v1", "v2", "v3"):
            _add(s, n)
        _add(s, "t1", "text")
    with sessions() as s:
        assert versions.promoted_version(session=s, modality="image") == "base"
    for n in ("v1", "v2", "v3"):
        with sessions.begin() as s:
            versions.promote(session=s, name=n)
    with sessions.begin() as s:
        versions.promote(session=s, name="t1")
    assert _status(sessions, "v1", "v2", "v3", "t1") == ["retired", "retired", "promoted",
                                                         "promoted"]
    steps = []
    for _ in range(3):
        with sessions.begin() as s:
            steps.append(versions.rollback(session=s, modality="image"))
    assert steps == [("v3", "v2"), ("v2", "v1"), ("v1", "base")]
    with sessions() as s:
        assert versions.promoted_version(session=s, modality="image") == "base"
        assert versions.promoted_version(session=s, modality="text") == "t1"  # untouched
    with sessions.begin() as s, pytest.raises(versions.VersionError, match="no promoted"):
        versions.rollback(session=s, modality="image")


def test_names_are_checked_and_unique(sessions):  # noqa: F811
    for bad in ("base", "", "-x", "a b", "x" * 101):
        with pytest.raises(InvalidInput):
            versions.check_version_name(bad)
    with sessions.begin() as s:
        _add(s, "v1")
    with pytest.raises(Exception), sessions.begin() as s:  # noqa: B017  (the primary key)
        _add(s, "v1")


BAD_NAMES = ["a\x00", "a\x00b", "v1\x00", "a\x1b[0m", "\ud800", "a b", "x" * 101]


def test_names_no_version_could_have_are_found_without_sql(sessions):  # noqa: F811
    """A NUL in a looked-up name was a DataError on PostgreSQL (a 500 at the API): every
    recorded name passed check_version_name, so other names are misses, or refused."""
    with sessions.begin() as s:
        _add(s, "v1")
    with sessions() as s:
        for bad in BAD_NAMES:
            assert versions.get_version(session=s, name=bad) is None
            assert versions.version_modalities(session=s, names=[bad, "v1"]) == {"v1": "image"}
            assert versions.version_refs(session=s, names=[bad]) == {}
            with pytest.raises(InvalidInput, match="not a version name"):
                versions.check_job_version(bad, "image", {})
    for bad in BAD_NAMES:
        with sessions.begin() as s, pytest.raises(versions.VersionError, match="no model"):
            versions.promote(session=s, name=bad)
        with sessions.begin() as s, pytest.raises(versions.VersionError, match="no model"):
            versions.remove_version(session=s, name=bad)


def test_a_job_resolves_its_version_when_it_starts(sessions):  # noqa: F811
    with sessions.begin() as s:
        _add(s, "v1")
        _add(s, "v2")
        before = store.create_job(session=s, modality="image", task="embed", payload=b"x").id
        named = store.create_job(session=s, modality="image", task="embed", payload=b"y",
                                 model_version="v2").id
        text = store.create_job(session=s, modality="text", task="embed", text="hi").id
    with sessions.begin() as s:
        versions.promote(session=s, name="v1")
    with sessions.begin() as s:
        started = store.start_jobs(session=s, job_ids=[before, named, text], worker="w")
    assert started[before].model_version == "v1"  # promoted when it started, not submitted
    assert started[named].model_version == "v2"  # what the job named
    assert started[text].model_version == "base"  # nothing promoted for text
    with sessions.begin() as s:  # a redelivery keeps the version it was resolved to
        versions.promote(session=s, name="v2")
        again = store.start_jobs(session=s, job_ids=[before], worker="w2")
    assert again[before].model_version == "v1"


def test_remove_refuses_promoted_and_waited_for_versions(sessions):  # noqa: F811
    with sessions.begin() as s:
        _add(s, "v1")
        _add(s, "v2")
        versions.promote(session=s, name="v1")
        store.create_job(session=s, modality="image", task="embed", payload=b"x",
                         model_version="v2")
    with sessions.begin() as s, pytest.raises(versions.VersionError, match="promoted"):
        versions.remove_version(session=s, name="v1")
    with sessions.begin() as s, pytest.raises(versions.VersionError, match="queued or running"):
        versions.remove_version(session=s, name="v2")
    with sessions.begin() as s:
        versions.remove_version(session=s, name="v2", force=True)
    with sessions() as s:
        assert versions.get_version(session=s, name="v2") is None


def test_job_version_checks(sessions):  # noqa: F811
    with sessions.begin() as s:
        _add(s, "img")
    with sessions() as s:
        known = versions.version_modalities(session=s, names=["img", "nope", "base"])
    assert known == {"img": "image"}
    assert versions.check_job_version("img", "image", known) == "img"
    assert versions.check_job_version("base", "text", known) == "base"
    with pytest.raises(InvalidInput, match="does not exist"):
        versions.check_job_version("nope", "image", known)
    with pytest.raises(InvalidInput, match="is for image jobs, not text"):
        versions.check_job_version("img", "text", known)
