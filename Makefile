# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VINCIE := $(VENV)/bin/vincie
STAMP := $(VENV)/.installed-stamp
DEMO ?= runs/demo

.PHONY: venv system-deps demo test test-slow clean

$(STAMP): setup.cfg pyproject.toml
	@echo "installing vincie and its dependencies into $(VENV) (a few minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Tools the tests run that pip does not install: Prometheus and promtool (the alert rules, the metrics integration
# test; Debian package), gcc (tests/test_clean_exit.py builds a preloaded library) and kubectl (`vincie k8s
# render` builds k8s/ with `kubectl kustomize`; the static release binary). Installed only when missing (needs
# root, as on this project's machines).
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update -qq && apt-get install -y --no-install-recommends prometheus)
	@command -v gcc >/dev/null || (apt-get update -qq && apt-get install -y --no-install-recommends gcc libc6-dev)
	@command -v kubectl >/dev/null || \
		(curl -fsSLo /usr/local/bin/kubectl https://dl.k8s.io/release/v1.32.4/bin/linux/amd64/kubectl && \
		 chmod +x /usr/local/bin/kubectl)

# The main job on the embedded default (tiny config, synthetic video world, local storage): make sessions,
# train the tiny MM-DiT with 2 processes, evaluate multi-turn editing, export the model and edit a picture
# turn by turn with the export.
demo: venv
	$(VINCIE) data synth --out $(DEMO)/data/train --sessions 8192 --resolution 32 --split train --seed 0 \
		--image-format png
	$(VINCIE) data synth --out $(DEMO)/data/val --sessions 16 --resolution 32 --split val --seed 0 \
		--min-turns 5 --turns 5 --image-format png
	$(VINCIE) data synth --out $(DEMO)/data/eval --sessions 64 --resolution 32 --split test --seed 0 \
		--min-turns 5 --turns 5 --image-format png --videos $(DEMO)/videos
	$(VINCIE) data index verify $(DEMO)/data/train --quick
	$(VINCIE) data show $(DEMO)/data/eval --out $(DEMO)/sessions.png --sessions 6
	$(VINCIE) launch local --nproc 2 --config tiny run.out_dir=$(DEMO)/tiny \
		data.train_url=$(DEMO)/data/train data.eval_url=$(DEMO)/data/eval \
		data.val_url=$(DEMO)/data/val train.eval_every=800 train.eval_sessions=16 train.eval_success_sessions=8
	$(VINCIE) report $(DEMO)/tiny
	$(VINCIE) eval --model $(DEMO)/tiny --bench synth --out $(DEMO)/eval --sessions 64 --turns 5
	$(VINCIE) export --checkpoint $(DEMO)/tiny --out $(DEMO)/model --overwrite
	$(VINCIE) edit --model $(DEMO)/model --image docs/images/demo-source.png --out $(DEMO)/edit \
		--instruction "turn the cyan circle orange" --instruction "the pink triangle grows" \
		--instruction "delete the pink triangle"
	@echo "demo: success per turn above; pictures: $(DEMO)/eval/grid.png $(DEMO)/edit/strip.png $(DEMO)/sessions.png" \
		"$(DEMO)/tiny/report.png (training and validation curves) $(DEMO)/tiny/validation/"

test: venv system-deps
	$(PY) -m pytest -q -m "not slow"

test-slow: venv system-deps
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
