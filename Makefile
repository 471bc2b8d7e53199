# raterseg: two commands for a fresh machine — `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch, pinned in the same pip command so pip never pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-all bench napari venv apt clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)" -e ".[napari,test,dev]"
	touch $(STAMP)

venv: $(STAMP)

# Headless napari needs an X server (Xvfb) and a few xcb libraries; installed when missing.
apt:
	@if ! command -v Xvfb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0 \
	    libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libxkbcommon-x11-0 libgl1 libegl1 \
	    libfontconfig1 libdbus-1-3 >/dev/null; \
	fi

demo: $(STAMP)
	$(BIN)/raterseg demo -o demo-output

test: apt $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

test-all: apt $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/classical_speed.py
	$(BIN)/python benchmarks/accuracy.py --device cpu

napari: $(STAMP)
	$(BIN)/napari

clean:
	rm -rf $(VENV) demo-output build *.egg-info
