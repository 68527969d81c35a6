import os
import subprocess
import time
import uuid

import pytest
import redis

from tests.helpers import free_port, pg_database, pg_drop

# No hub at run time: every weight comes from an installed package or a local dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def model():
    from core.model.multimodal import MultimodalModel

    return MultimodalModel.load(device="cpu")


@pytest.fixture(scope="session")
def fp32_model():
    """The model in fp32 whatever the CPU: the reference that parity tests compare with
    sentence-transformers and timm, and that the precision tests compare bf16 with
    (``model`` has the defaults: bf16 text and image towers on CPUs with native bf16)."""
    from core.config import Settings
    from core.model.multimodal import MultimodalModel

    return MultimodalModel.load(device="cpu", settings=Settings(
        text_precision="fp32", image_precision="fp32"))


# A SQLite file and a PostgreSQL database: every module that asks runs on both.
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mmq.db'}"
        return
    name = f"mmq_e2e_{uuid.uuid4().hex[:10]}"
    yield pg_database(name)
    pg_drop(name)


# -- Redis: a redis-server of the tests' own, a database per module or test -----------------
# Redis databases: enough for one per test module and per test that asks for its own.
# Numbers below FIRST_FREE_DB are left to modules that still hard-code theirs.
REDIS_DATABASES, FIRST_FREE_DB = 256, 16


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Our own redis-server on a free port: no test touches the machine's Redis."""
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(d),
                             "--databases", str(REDIS_DATABASES)],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        pytest.fail("redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def new_broker(redis_server):
    """-> a function returning the URL of a Redis database no other test has used,
    flushed: no module or test sees another's messages, bindings or locks, whatever
    order they run in. For module-scoped stacks; tests use ``broker_url``."""
    numbers = iter(range(FIRST_FREE_DB, REDIS_DATABASES))

    def new() -> str:
        url = f"{redis_server}/{next(numbers)}"
        redis.Redis.from_url(url).flushdb()
        return url

    return new


@pytest.fixture
def broker_url(new_broker) -> str:
    """A Redis database of this test's own."""
    return new_broker()


@pytest.fixture
def redis_proxy(redis_server):
    """bench/faults.py's TcpProxy in front of the tests' redis-server: a link to cut."""
    from bench.faults import TcpProxy

    url = redis.Redis.from_url(redis_server).connection_pool.connection_kwargs
    p = TcpProxy(url["host"], url["port"])
    yield p
    p.close()


# -- CI fails, not skips, when a service is missing -----------------------------------------
# With MMQ_REQUIRE_SERVICES=1 (set by .ci/run) a skipped test is a failed one: a missing
# redis-server, PostgreSQL, espeak-ng, C compiler or docker client would otherwise pass CI
# quietly with the tests that need it not run. Only skips for what a machine may simply
# not have are kept, listed here by the reason their test gives:
INHERENT_SKIPS = (
    "needs a CUDA device",            # tests/core/model/test_attention.py: CPU-only machines
    "docker has no compose plugin",   # tests/test_compose.py: the schema tests still run
    "no docker client",               # likewise
    "this CPU has no bf16 kernels",   # tests/helpers.needs_bf16: AVX2-only CPUs run fp32
)


def _require_services() -> bool:
    return os.environ.get("MMQ_REQUIRE_SERVICES", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and _require_services()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(allowed in reason for allowed in INHERENT_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"{reason}\nMMQ_REQUIRE_SERVICES=1: a test that needs a missing "
                       "service fails instead of skipping (see tests/conftest.py)")
