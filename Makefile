# The two quick-start commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.msam-fused-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): $(SOURCES) scripts/setup_env.sh
	VENV=$(VENV) scripts/setup_env.sh
	touch $@

demo: setup
	$(PY) bench/train.py --data digits --compare sgd,sam,msam

# pytest exits 5 when it collects nothing; that is not a failure, anything else is.
test: setup
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

clean:
	rm -rf build *.egg-info msam_fused/*.so $(STAMP)
