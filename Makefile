# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VINCIE := $(VENV)/bin/vincie
STAMP := $(VENV)/.installed-stamp
DEMO ?= runs/demo

.PHONY: venv demo test test-slow clean

$(STAMP): setup.cfg pyproject.toml
	@echo "installing vincie and its dependencies into $(VENV) (a few minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded default (tiny config, synthetic video world, local storage). Until the training
# spine lands it is the data part: synthesize, index, verify, summarise and draw sessions.
demo: venv
	$(VINCIE) data synth --out $(DEMO)/data/train --sessions 2048 --split train --seed 0
	$(VINCIE) data synth --out $(DEMO)/data/eval --sessions 64 --split test --seed 0 --videos $(DEMO)/videos
	$(VINCIE) data index verify $(DEMO)/data/train
	$(VINCIE) data index stats $(DEMO)/data/train --plot $(DEMO)/stats.png
	$(VINCIE) data show $(DEMO)/data/eval --out $(DEMO)/sessions.png --sessions 6
	@echo "demo: sessions in $(DEMO)/data, pictures: $(DEMO)/sessions.png $(DEMO)/stats.png, videos: $(DEMO)/videos"

test: venv
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
