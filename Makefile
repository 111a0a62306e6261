# Two entry points, each sets itself up from a clean clone:
#   make test   create .venv if missing, install .[test], run every test (slow ones included)
#   make demo   same set-up, then run the end-to-end offline demo
#   make bench  same set-up, then the speed figures of this machine (benchmarks/cpu_report.py)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# The fused attention kernel (caption_attn/fused.py), compiled for the venv's TensorFlow
# unless its record says it is built for it, from this source and flags (also after a
# `pip install -U tensorflow` or with another VENV)
KERNEL  = $(BIN)/python -m caption_attn.fused --check > /dev/null 2>&1 || \
          $(BIN)/python -m caption_attn.fused

.PHONY: test test-fast demo bench clean kernel

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

kernel: $(STAMP)
	@$(KERNEL)

# Two pytest workers, one test file each at a time (module fixtures built once): most tests
# are single-threaded Python/TF tracing, so two of them share the 2 cores of CI's machines.
# Files go out in collection order, heaviest first (tests/conftest.py: FILE_SECONDS). One
# TensorFlow op thread per worker: two workers with two threads each on 2 cores ran 6% slower.
PYTEST  = TF_NUM_INTRAOP_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile \
          --no-loadscope-reorder

test: $(STAMP) kernel
	$(PYTEST) --durations=15

test-fast: $(STAMP) kernel
	$(PYTEST) -m "not slow"

# the demo and the benchmarks run without the kernel where it cannot be built (train says so)
demo: $(STAMP)
	-@$(KERNEL)
	$(BIN)/caption-attn demo

# Every speed target of issue #11 on this CPU, each benchmark run REPEATS times
# (on 2 Zen 4 cores ~4 min per repeat).
REPEATS ?= 3
bench: $(STAMP)
	-@$(KERNEL)
	$(BIN)/python benchmarks/cpu_report.py --repeats $(REPEATS) --json bench_report.json

clean:
	rm -rf $(VENV) build *.egg-info caption_attn/kernels/_additive_attention*
