# The quick-start commands: `make demo` and `make test` (README); CI runs `make test ctest`.
# All create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.msam-fused-installed
SOURCES := setup.py pyproject.toml tools/cuda_toolkit.py $(shell find csrc -type f 2>/dev/null)
CMAKE ?= $(shell command -v cmake || echo $(VENV)/bin/cmake)
CMAKE_BUILD := build/cmake
JOBS ?= 2

.PHONY: setup demo test ctest bench-cpu clean

setup: $(STAMP)

$(STAMP): $(SOURCES) scripts/setup_env.sh
	VENV=$(VENV) scripts/setup_env.sh
	touch $@

demo: setup
	$(PY) bench/train.py --data digits --compare sgd,sam,msam

# pytest exits 5 when it collects nothing; that is not a failure, anything else is.
test: setup
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# The C++ tests of csrc/ (CMakeLists.txt), built against the venv's torch.
ctest: setup
	test -x "$(CMAKE)" || $(PY) -m pip install -q cmake
	$(CMAKE) -S . -B $(CMAKE_BUILD) -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release
	$(CMAKE) --build $(CMAKE_BUILD) -j$(JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

# The CPU step benchmark of docs/kernels.md (writes bench/results/cpu_fused_step.json).
bench-cpu: setup
	$(PY) bench/fused_step_cpu.py --out bench/results/cpu_fused_step.json

clean:
	rm -rf build *.egg-info msam_fused/*.so $(STAMP)
