# The two commands of the README. Each creates .venv and installs what it needs on first use.
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.dinollama-installed

.PHONY: demo test

demo: $(STAMP)
	$(BIN)/dinollama demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	@# the native decode kernels (C++, torch.utils.cpp_extension); without a compiler torch's kernels run
	$(BIN)/python -c "from dinollama.nn import native; print('dinollama native decode kernels:', native.describe())"
	@# the web page's browser test needs Debian's chromium; best effort (it is skipped without one)
	-command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	touch $@
