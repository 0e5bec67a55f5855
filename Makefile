# Two commands do everything on a fresh machine:
#   make demo   pack the default model for rpi5, serve it, answer a prompt through the socket
#   make test   lint, type-check and run the test suite (installs Mosquitto if missing)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint pytest setup mosquitto mender clean test-arm test-systemd

setup: $(STAMP)

# llama-cpp-python first, from edgerunner's own wheel cache, built with explicit portable flags
# (tools/build/llama_build.py says why); pip then finds its pin satisfied and builds nothing itself.
$(STAMP): pyproject.toml tools/build/llama_build.py
	python3 -m venv $(VENV)
	python3 tools/build/llama_build.py --install $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

mosquitto:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto (Debian package) for the MQTT tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }

# Debian 12's mender-client 3.4 and mender-artifact 3.9 for the fleet-update tests (a few
# seconds from the Debian mirror); without root the tests skip and say why.
mender:
	@command -v mender >/dev/null && command -v mender-artifact >/dev/null || { \
	  [ "$$(id -u)" != 0 ] || { echo "installing mender-client and mender-artifact (Debian packages) for the fleet tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mender-client mender-artifact >/dev/null; }; }

demo: $(STAMP)
	$(PY) -m compileall -q edgerunner
	$(PY) tools/examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check edgerunner tests tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Python source compiled once, as a wheel install does: where PYTHONDONTWRITEBYTECODE is set,
# every daemon and child process the tests start would compile edgerunner again (~0.25 s each)
pytest: $(STAMP) mosquitto mender
	$(PY) -m compileall -q edgerunner tests tools
	$(PY) -m pytest --durations=15

test: lint pytest

# The emulated-aarch64 lane (tools/arm/lane.py): Pi 5 / Pi 4 / Pi Zero 2 W CPUs under qemu-user.
# Root only; cold ~20 min (debootstrap + cross builds, cached), warm ~5 min.
test-arm: $(STAMP)
	$(PY) tools/arm/lane.py

# The real-systemd lane (tools/systemd/lane.py): Debian 12 under systemd-nspawn, systemd as PID 1.
# Root only; installs systemd-container (without recommends: libnss-mymachines would edit the
# host's nsswitch.conf), debootstrap and zstd if missing. Cold: debootstrap + wheelhouse, cached.
test-systemd: $(STAMP) mosquitto
	@command -v systemd-nspawn >/dev/null && command -v debootstrap >/dev/null && command -v zstd >/dev/null || { \
	  echo "installing systemd-container, debootstrap and zstd (Debian packages) for the systemd lane"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd-container debootstrap zstd >/dev/null; }
	$(PY) tools/systemd/lane.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
