"""Jobs belong to the API key that made them: the real API (create_app on a real
redis-server and real SQLite/PostgreSQL) with two named keys, one unnamed key and one
admin key. No worker reads the queue, so jobs stay queued and cancellable.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from core.config import LOCAL_API_KEY, Settings
from producer.sdk import Client
from producer.web.auth import key_id_of, keyring, parse_keys

ALICE, BOB, ANON, ROOT = "alice-secret-1f9e", "bob-secret-77c2", "nameless-secret-d41", \
    "root-secret-0b5a"
SECRETS = (ALICE, BOB, ANON, ROOT)
A, B, N, ADMIN = ({"Authorization": f"Bearer {k}"} for k in SECRETS)


@pytest.fixture(scope="module")
def api(new_broker, database_url):
    from producer.api import create_app

    broker = new_broker()
    redis.Redis.from_url(broker).flushdb()
    s = Settings(broker_url=broker, database_url=database_url,
                 api_keys=f"alice:{ALICE}, bob:{BOB},{ANON}", admin_keys=f"ops:{ROOT}")
    app = create_app(s)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.client.close()


def _submit(api, auth: dict, text_: str = "whose job is this") -> str:
    r = api.post("/v1/jobs", headers=auth, json={"text": text_})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _not_found(r) -> None:
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"


def test_another_key_gets_404_on_get_wait_and_cancel(api):
    job = _submit(api, A)
    _not_found(api.get(f"/v1/jobs/{job}", headers=B))
    _not_found(api.get(f"/v1/jobs/{job}/wait", params={"timeout": 0}, headers=B))
    _not_found(api.delete(f"/v1/jobs/{job}", headers=B))
    _not_found(api.get(f"/v1/jobs/{job}", headers=N))
    mine = api.get(f"/v1/jobs/{job}", headers=A)
    assert mine.status_code == 200 and mine.json()["status"] == "queued"  # B cancelled nothing
    assert mine.json()["owner"] == "alice"
    # The answer for another key's job is the answer for no job at all.
    other = api.get(f"/v1/jobs/{uuid.uuid4()}", headers=B).json()["error"]
    assert other["code"] == "not_found"
    r = api.delete(f"/v1/jobs/{job}", headers=A)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_lists_are_scoped_and_admin_sees_all(api):
    a = {_submit(api, A, f"alice {i}") for i in range(3)}
    b = {_submit(api, B, f"bob {i}") for i in range(2)}

    def listed(auth: dict, limit: int = 2) -> set[str]:  # every page, small pages
        seen, cursor = set(), None
        while True:
            params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            page = api.get("/v1/jobs", params=params, headers=auth).json()
            seen |= {j["id"] for j in page["jobs"]}
            if not (cursor := page["next_cursor"]):
                return seen

    assert a <= listed(A) and not b & listed(A)
    assert b <= listed(B) and not a & listed(B)
    assert not (a | b) & listed(N)
    assert a | b <= listed(ADMIN)
    for job in a | b:
        assert api.get(f"/v1/jobs/{job}", headers=ADMIN).status_code == 200
    r = api.get(f"/v1/jobs/{next(iter(b))}/wait", params={"timeout": 0}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["owner"] == "bob"


def test_admin_cancels_any_job_and_its_own_jobs_are_its_own(api):
    job = _submit(api, B)
    r = api.delete(f"/v1/jobs/{job}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    own = _submit(api, ADMIN)
    assert api.get(f"/v1/jobs/{own}", headers=ADMIN).json()["owner"] == "ops"
    _not_found(api.get(f"/v1/jobs/{own}", headers=A))


def test_jobs_made_without_a_key_are_for_admins_only(api, database_url):
    sdk = Client(settings=Settings(broker_url=api.app.state.settings.broker_url,
                                   database_url=database_url), migrate=False)
    try:
        job = sdk.submit_text("from the SDK")
    finally:
        sdk.close()
    _not_found(api.get(f"/v1/jobs/{job}", headers=A))
    assert api.get(f"/v1/jobs/{job}", headers=ADMIN).json()["owner"] is None


def test_owner_is_the_key_id_and_no_key_is_stored(api, database_url):
    ids = {"alice": _submit(api, A), key_id_of(ANON): _submit(api, N)}
    h = {**A, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    ids["alice-idem"] = _submit(api, h)
    assert key_id_of(ANON) == f"key-{hashlib.sha256(ANON.encode()).hexdigest()[:12]}"
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            owners = dict(conn.execute(text("SELECT id, owner FROM jobs")).all())
            dumps = [" ".join(map(str, row)) for table in ("jobs", "idempotency_keys")
                     for row in conn.execute(text(f"SELECT * FROM {table}")).all()]
    finally:
        engine.dispose()
    assert owners[ids["alice"]] == owners[ids["alice-idem"]] == "alice"
    assert owners[ids[key_id_of(ANON)]] == key_id_of(ANON)
    for secret in SECRETS:
        assert not [d for d in dumps if secret in d], "a key is stored in SQL"


def test_idempotency_keys_stay_scoped_per_key(api):
    h = f"same-{uuid.uuid4()}"
    body = {"text": "retried by two clients"}
    first = api.post("/v1/jobs", json=body, headers={**A, "Idempotency-Key": h}).json()["id"]
    again = api.post("/v1/jobs", json=body, headers={**A, "Idempotency-Key": h})
    assert again.json()["id"] == first and again.headers["Idempotent-Replayed"] == "true"
    other = api.post("/v1/jobs", json=body, headers={**B, "Idempotency-Key": h})
    assert other.status_code == 202 and other.json()["id"] != first
    assert other.headers["Idempotent-Replayed"] == "false"
    _not_found(api.get(f"/v1/jobs/{first}", headers=B))


def test_a_replay_is_the_first_answer_again_on_both_submit_routes(api):
    """docs/api.md: a replay returns the first call's answer (202, the same ids and
    ``status: queued``, the same Location) whatever the jobs did since, and says it is
    one (``Idempotent-Replayed: true``) on both submit routes; the jobs' state now is at
    the Location."""
    body = {"text": "replayed after it ended"}
    h = {**A, "Idempotency-Key": f"one-{uuid.uuid4()}"}
    first = api.post("/v1/jobs", json=body, headers=h)
    job = first.json()["id"]
    assert api.delete(f"/v1/jobs/{job}", headers=A).status_code == 200  # it ended since
    again = api.post("/v1/jobs", json=body, headers=h)
    assert again.status_code == 202 and again.json() == first.json()
    assert again.headers["Location"] == first.headers["Location"] == f"/v1/jobs/{job}"
    assert (first.headers["Idempotent-Replayed"], again.headers["Idempotent-Replayed"]) == \
        ("false", "true")
    assert api.get(again.headers["Location"], headers=A).json()["status"] == "cancelled"

    batch = {"items": [{"text": "one of two"}, {"text": "two of two"}]}
    h = {**A, "Idempotency-Key": f"batch-{uuid.uuid4()}"}
    first = api.post("/v1/jobs:batch", json=batch, headers=h)
    again = api.post("/v1/jobs:batch", json=batch, headers=h)
    assert first.status_code == again.status_code == 202
    assert first.json()["replayed"] is False and again.json()["replayed"] is True
    assert again.json()["jobs"] == first.json()["jobs"]
    assert again.headers["Location"] == first.headers["Location"]
    assert (first.headers["Idempotent-Replayed"], again.headers["Idempotent-Replayed"]) == \
        ("false", "true")


def test_unknown_keys_and_names_are_401(api):
    for bad in ("alice", f"alice:{ALICE}", "ops", ALICE[:-1], ""):
        r = api.get("/v1/jobs", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401, bad


# -- parsing keys (no services) -------------------------------------------------------

def test_key_specs_parse_to_ids_never_to_secrets():
    keys = parse_keys(f"alice:{ALICE}, {ANON} ,,")
    assert [(k.caller.key_id, k.secret.decode(), k.caller.admin) for k in keys] == [
        ("alice", ALICE, False), (key_id_of(ANON), ANON, False)]
    assert keys[0].caller.key_digest != keys[1].caller.key_digest
    assert parse_keys(f"ops:{ROOT}", admin=True)[0].caller.scope is None
    assert keys[0].caller.scope == "alice"
    for bad in (f"{'n' * 65}:{ALICE}", f"bad name:{ALICE}", "alice:"):
        with pytest.raises(ValueError):
            parse_keys(bad)


def test_local_profile_key_works_only_while_no_key_is_set():
    local = keyring(Settings(profile="local"))
    assert [(k.secret.decode(), k.caller.key_id) for k in local] == [(LOCAL_API_KEY, "local")]
    assert keyring(Settings(profile="production")) == []
    assert all(k.secret != LOCAL_API_KEY.encode()
               for k in keyring(Settings(profile="local", api_keys=f"alice:{ALICE}")))


# -- the SDK and CLI: trusted, everything by default, owner= to scope -------------------

def test_sdk_and_cli_scope_reads_by_owner(broker_url, database_url, monkeypatch, capsys):
    from core.config import get_settings
    from producer import cli

    broker = broker_url
    sdk = Client(settings=Settings(broker_url=broker, database_url=database_url))
    try:
        job = sdk.submit(
            [{"modality": "text", "input": "alice's, via the SDK"}], owner="alice").ids[0]
        assert sdk.get(job)["owner"] == "alice" == sdk.get(job, owner="alice")["owner"]
        assert sdk.get(job, owner="bob") is None
        assert job in {j["id"] for j in sdk.results(owner="alice", limit=1000)}
        assert job not in {j["id"] for j in sdk.results(owner="bob", limit=1000)}
        with pytest.raises(TimeoutError):
            sdk.wait([job], timeout=0, owner="bob")
        assert sdk.cancel(job, owner="bob") is False and sdk.get(job)["status"] == "queued"
    finally:
        sdk.close()
    monkeypatch.setenv("MMQ_BROKER_URL", broker)
    monkeypatch.setenv("MMQ_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        for owner, listed in (("alice", True), ("bob", False)):
            assert cli.main(["results", "--owner", owner, "--limit", "1000", "--json"]) == 0
            assert (job in capsys.readouterr().out) is listed
        assert cli.main(["cancel", job]) == 0  # the CLI is trusted: no owner needed
    finally:
        get_settings.cache_clear()
