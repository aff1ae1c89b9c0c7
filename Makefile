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

# 8x8 digits: shards, a class-conditional sCT UNet trained from scratch (~3 minutes on 2 cores), a 2-step grid.
demo: $(STAMP)
	$(PYTHON) -m scmlab.cli prepare digits --out $(DEMO)/shards
	$(PYTHON) -m scmlab.cli train --config jobs/configs/digits-sct.yaml data.train=$(DEMO)/shards run.dir=$(DEMO)/run
	$(PYTHON) -m scmlab.cli sample --checkpoint $(DEMO)/run --steps 2 --n 100 --out $(DEMO)/samples.npz \
		--grid $(DEMO)/samples-2step.png
	@echo "2-step samples (one class per column, 0-9): $(DEMO)/samples-2step.png"

bench: $(STAMP)
	@mkdir -p runs
	$(PYTHON) jobs/bench.py --suite step --device $(DEVICE) --json runs/bench-$(DEVICE).json

clean:
	rm -rf $(DEMO) $(STAMP)
