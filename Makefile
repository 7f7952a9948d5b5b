# Everything a fresh machine needs, from the project's own files.
#   make demo   prepare shakespeare_char, train a small MoE on CPU, sample from it
#   make test   run the test suite (what .ci/run calls), and list its 15 slowest tests
#   make test-fast   the unit tier only: every test not marked slow (no training runs), about 1.5 minutes
PY := .venv/bin/python

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch first and pinned: a bare "torch" requirement could pull a multi-GB CUDA build
	.venv/bin/pip install -q torch==2.13.0
	# requirements.txt leaves triton free (a GPU's torch brings its own): here the one the tests were run with
	.venv/bin/pip install -q -r requirements.txt "triton==3.9.0; platform_system == 'Linux' and platform_machine == 'x86_64'"
	# build the CPU grouped-GEMM kernel now, not in the first training step (warns if it cannot)
	.venv/bin/python -c "from moe_kernels import cpu_grouped_mm; cpu_grouped_mm.available()"
	touch .venv/installed

venv: .venv/installed

demo: venv
	$(PY) data/shakespeare_char/prepare.py
	$(PY) train.py config/train_shakespeare_char_moe_cpu.py
	$(PY) sample.py --out_dir=out-shakespeare-char-moe-cpu --start="ROMEO:" --num_samples=2 --max_new_tokens=300 --device=cpu

test: venv
	$(PY) -m pytest -q --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

.PHONY: venv demo test test-fast
