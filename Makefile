# The README's commands. `make demo` and `make test` install what they need first (once, tracked by a stamp file).
PYTHON ?= python3
# The CPU build that lies in these machines' pip find-links; set TORCH=... for another build.
TORCH ?= torch==2.13.0
DEVICE ?= cpu
STAMP := build/install.stamp
DEMO := runs/demo

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[test]"
	@mkdir -p $(dir $@) && touch $@

test: $(STAMP)
	$(PYTHON) -m pytest -q

# The main job on one machine: local S3 + MLflow servers, 8x8 digits into S3, sCT on 2 Ray Train CPU workers
# streaming from S3 (~6 minutes on 2 cores), a 2-step grid; prints where to look (jobs/demo.py).
demo: $(STAMP)
	$(PYTHON) jobs/demo.py --out $(DEMO)

bench: $(STAMP)
	@mkdir -p runs
	$(PYTHON) jobs/bench.py --suite step --device $(DEVICE) --json runs/bench-$(DEVICE).json

clean:
	rm -rf $(DEMO) $(STAMP)
