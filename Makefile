# The two commands of the README: `make run` and `make test`. Both create the
# virtualenv on first use (torch comes from this machine's local wheel index).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmq-installed

.PHONY: run test lint bench

# Any kernel source edited: pip builds the C kernels again (setup.py).
$(STAMP): pyproject.toml setup.py $(wildcard core/model/kernels/*.c core/model/kernels/*.h)
	@# espeak-ng synthesises the spoken-word training set (Debian package); as root
	@# it is installed here, otherwise the tests that need it say so and skip.
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng >/dev/null; } \
	  || echo "note: espeak-ng is not installed; audio training tests will be skipped"
	@# Debian's chromium and chromedriver: the browser tests (results page, Flower's task list).
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } \
	  || echo "note: chromium/chromium-driver are not installed; the browser tests will fail"
	@# redis-sentinel: the broker-failover test (tests/e2e/test_sentinel.py).
	@command -v redis-sentinel >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-sentinel >/dev/null; } \
	  || echo "note: redis-sentinel is not installed; the broker-failover test will be skipped"
	@# faketime: workers with skewed wall clocks (tests/e2e/test_clocks.py, bench/cluster.py).
	@command -v faketime >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime >/dev/null; } \
	  || echo "note: faketime is not installed; the skewed-clock tests will be skipped"
	@# prometheus: promtool tests the alert rules; the binary runs in tests/e2e/test_prometheus.py.
	@command -v promtool >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; } \
	  || echo "note: prometheus is not installed; the alert-rule tests will be skipped"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mmq up --demo

# Two test processes, a test file each at a time (module-scoped stacks stay in one
# process): 9.5 min instead of 17 on the 2-core machine, the end-to-end tests mostly
# wait on workers, leases and timeouts. Each process has its own redis-server,
# PostgreSQL databases and temporary folders (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/attention.py
	$(PY) bench/text_embed.py
