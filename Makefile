# `make demo` and `make test` each set up everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum setup.cfg | cut -d' ' -f1)

.PHONY: demo demo-seeds demo-long demo-practice demo-history test bench install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is named in the same pip command as everything else so pip keeps the CPU build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pandora_lightning demo --overwrite

# The demo trained with 3 seeds: every figure per seed, with mean and spread (about 3x `make demo`).
demo-seeds: $(STAMP)
	$(PY) -m pandora_lightning demo --seeds 3 --run-dir runs/demo-seeds

# The demo's recipes trained 2x (align) and 4x (instruct) longer, about 27 minutes: the model that meets
# the world benchmark's in-domain bars (README, "The demo model").
demo-long: $(STAMP)
	$(PY) -m pandora_lightning demo --long --overwrite

# The history demo's model (recipes/tiny-history, 3-round windows) trained as long as demo-long beside the
# world's practice domains, the instruct stage on recoloured clips too, then polished on the scored
# domains (on its own drafts, weights averaged), about 35 minutes: the transfer figures (README, "The demo model", "Transfer").
demo-practice: $(STAMP)
	$(PY) -m pandora_lightning demo --practice --long --overwrite

# The history world (rounds said as "again" / "go back") and recipes/tiny-history, trained as long as
# demo-long, about 31 minutes: the model behind the README's history figures ("Sessions").
demo-history: $(STAMP)
	$(PY) -m pandora_lightning demo --history --long --overwrite

# tests/test_play.py drives the play page in Debian's chromium through chromium-driver: installed
# here when missing (apt, as root); where that is impossible the page test says why and is skipped.
BROWSER := $(VENV)/.browser

$(BROWSER): $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	    || echo "could not install chromium + chromium-driver: the page test in tests/test_play.py will be skipped"; }
	touch $@

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pandora_lightning bench

clean:
	rm -rf runs data bench.json
