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

# The main job on the embedded default (tiny config, synthetic video world, local storage): make sessions,
# train the tiny MM-DiT with 2 processes, evaluate multi-turn editing, export the model and edit a picture
# turn by turn with the export.
demo: venv
	$(VINCIE) data synth --out $(DEMO)/data/train --sessions 8192 --resolution 32 --split train --seed 0 \
		--image-format png
	$(VINCIE) data synth --out $(DEMO)/data/eval --sessions 64 --resolution 32 --split test --seed 0 \
		--min-turns 5 --turns 5 --image-format png --videos $(DEMO)/videos
	$(VINCIE) data index verify $(DEMO)/data/train --quick
	$(VINCIE) data show $(DEMO)/data/eval --out $(DEMO)/sessions.png --sessions 6
	$(VINCIE) launch local --nproc 2 --config tiny run.out_dir=$(DEMO)/tiny \
		data.train_url=$(DEMO)/data/train data.eval_url=$(DEMO)/data/eval
	$(VINCIE) eval --model $(DEMO)/tiny --bench synth --out $(DEMO)/eval --sessions 32 --turns 5
	$(VINCIE) export --checkpoint $(DEMO)/tiny --out $(DEMO)/model --overwrite
	$(VINCIE) edit --model $(DEMO)/model --image docs/images/demo-source.png --out $(DEMO)/edit \
		--instruction "turn the cyan circle orange" --instruction "the pink triangle grows" \
		--instruction "delete the pink triangle"
	@echo "demo: success per turn above; pictures: $(DEMO)/eval/grid.png $(DEMO)/edit/strip.png $(DEMO)/sessions.png"

test: venv
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
