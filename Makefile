# Developer entry points. Only python3 is needed; everything else goes into .venv.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCHVISION ?= torchvision==0.28.0
TIMM ?= timm==1.0.31
PYTEST_FLAGS ?= -q -ra --strict-markers --durations=10 -n auto

PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxprune-installed

.PHONY: venv test demo bench clean distclean

venv: $(STAMP)

# torch is pinned and installed first so that nothing below replaces it; torchvision and timm
# are only used for their pure-Python model definitions, hence --no-deps (timm's other
# dependencies, huggingface_hub, safetensors and pyyaml, are pinned in the dev extras).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]" "$(TORCH)"
	$(PY) -m pip install --no-deps "$(TORCHVISION)" "$(TIMM)"
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_FLAGS)

demo: venv
	$(PY) examples/demo.py

bench: venv
	$(PY) benchmarks/compact_speed.py
	$(PY) benchmarks/sequence_models.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/methods.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
