# The README's commands. `make demo` and `make test` install what they need first (once, tracked by a stamp file).
PYTHON ?= python3
# The CPU build that lies in these machines' pip find-links; set TORCH=... for another build.
TORCH ?= torch==2.13.0
DEVICE ?= cpu
STAMP := build/install.stamp
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO := runs/demo
SWEEP_DEMO := runs/sweep-demo
SCALING_DEMO := runs/scaling-demo
ABLATION_DEMO := runs/ablation-demo

.PHONY: install system-data test demo sweep-demo scaling-demo ablation-demo bench clean

install: $(STAMP) system-data

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[test]"
	@mkdir -p $(dir $@) && touch $@

# Fashion-MNIST comes from Debian (`datasets/fashion-mnist.yaml`; the tests read it): installed here when missing and
# this is root with apt-get, otherwise one line says how.
system-data:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing ($(FASHION_MNIST)): run  sudo apt-get install dataset-fashion-mnist" >&2; \
	  fi; \
	fi

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The main job on one machine: local S3 + MLflow servers, 8x8 digits into S3, sCT on 2 Ray Train CPU workers
# streaming from S3 (~6 minutes on 2 cores), a 2-step grid; prints where to look (jobs/demo.py).
demo: install
	$(PYTHON) jobs/demo.py --out $(DEMO)

# A real scaling sweep on one machine: local S3 + MLflow servers, the 2-D toy mixture, 3 MLP sizes x 2 learning rates
# on Ray Tune (a local Ray, 2 trials at a time; ~10 minutes on 2 cores), the fitted law and plots in the MLflow parent
# run and in $(SWEEP_DEMO)/sweep. Rerunning resumes: finished trials are not rerun.
sweep-demo: install
	$(PYTHON) -m scmlab.cli services up
	$(PYTHON) -m scmlab.cli prepare toy-gmm --out $(SWEEP_DEMO)/shards
	RAY_ADDRESS=local $(PYTHON) -m scmlab.cli services run -- $(PYTHON) jobs/sweep.py \
		--config jobs/configs/sweep-toy.yaml data.train=$(SWEEP_DEMO)/shards run.dir=$(SWEEP_DEMO)/sweep

# The scaling study on one machine: the 2-D mixture, 5 MLP sizes, a diffusion teacher grid, then sCD and sCT
# students from each size's best teacher (jobs/configs/sweep-study-toy.yaml); report.md, the laws per stage and
# sampler and the student/teacher ratios in the MLflow parent run and in $(SCALING_DEMO)/study. Rerunning resumes.
scaling-demo: install
	$(PYTHON) -m scmlab.cli services up
	$(PYTHON) -m scmlab.cli prepare toy-gmm --out $(SCALING_DEMO)/shards
	RAY_ADDRESS=local $(PYTHON) -m scmlab.cli services run -- $(PYTHON) jobs/sweep.py \
		--config jobs/configs/sweep-study-toy.yaml data.train=$(SCALING_DEMO)/shards run.dir=$(SCALING_DEMO)/study

# The sCT ablation on one machine: the paper's setting and 4 changes, 3 seeds each, on the 2-D mixture
# (jobs/configs/sweep-ablation-toy.yaml); each setting's mean and spread in report.md (MLflow parent run and
# $(ABLATION_DEMO)/ablation). Rerunning resumes.
ablation-demo: install
	$(PYTHON) -m scmlab.cli services up
	$(PYTHON) -m scmlab.cli prepare toy-gmm --out $(ABLATION_DEMO)/shards
	RAY_ADDRESS=local $(PYTHON) -m scmlab.cli services run -- $(PYTHON) jobs/sweep.py \
		--config jobs/configs/sweep-ablation-toy.yaml data.train=$(ABLATION_DEMO)/shards \
		run.dir=$(ABLATION_DEMO)/ablation

bench: $(STAMP)
	@mkdir -p runs
	$(PYTHON) jobs/bench.py --suite step --device $(DEVICE) --json runs/bench-$(DEVICE).json

clean:
	rm -rf $(DEMO) $(SWEEP_DEMO) $(SCALING_DEMO) $(ABLATION_DEMO) $(STAMP)
