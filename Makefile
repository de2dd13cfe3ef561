# The two commands of the quick start. Each installs what it needs first (CPU torch from
# this machine's disk, then the package and its test tools).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"
	@$(PIP) -e ".[test]"

demo: install
	$(PYTHON) launch/demo.py

# pytest exits 5 when it collects no test (e.g. a -k filter that matches nothing): say so
# and pass that code on; .ci/run decides what it means for CI.
test: install
	@$(PYTHON) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$status

bench: install
	$(PYTHON) benchmarks/overhead.py
	$(PYTHON) benchmarks/crypto_overhead.py
	$(PYTHON) benchmarks/wan.py
	$(PYTHON) benchmarks/uploads.py
	$(PYTHON) benchmarks/hostile.py
	$(PYTHON) benchmarks/reachable.py
	$(PYTHON) benchmarks/parallel.py
	$(PYTHON) benchmarks/soak.py
	$(PYTHON) benchmarks/privacy.py --data ../shared/data/sst2
	$(PYTHON) benchmarks/parity.py --data ../shared/data/sst2
	$(PYTHON) benchmarks/parity.py --data ../shared/data/sst2 --sub-servers 2 --run-dir runs/parity-hierarchical
	$(PYTHON) benchmarks/parity.py --data ../shared/data/sst2 --run-dir runs/parity-lora peft.method=lora
	$(PYTHON) benchmarks/parity.py --data ../shared/data/sst2 --pretrain-base --run-dir runs/parity-lora-base peft.method=lora optim.lr=0.005
	$(PYTHON) benchmarks/parity.py --data ../shared/data/sst2 --base runs/parity-lora-base/base --run-dir runs/parity-lora-base4 peft.method=lora optim.lr=0.005 trainer.max_epochs=4
	$(PYTHON) benchmarks/parity.py --data ../shared/data/sst2 --pretrain-base --pretrain-verdicts terrible,great --run-dir runs/parity-ptuning-verdicts \
		peft.method=ptuning_v2 optim.lr=0.01
	$(PYTHON) benchmarks/parity.py --data ../shared/data/sst2 --base runs/parity-ptuning-verdicts/base --global-batch --run-dir runs/parity-ptuning-sgd \
		peft.method=ptuning_v2 optim.name=sgd optim.momentum=0.9 optim.lr=5 trainer.max_epochs=6
