# safeptq developer targets. `make demo` = set-up + the main job on the embedded default model.
PY := .venv/bin/python

.PHONY: setup demo quick-eval test test-unit lint
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/safeptq demo --out runs/demo

# the earlier quick look: the default model alone on 64 AdvBench prompts (about 2 minutes)
quick-eval: setup
	.venv/bin/safeptq eval --model default --suite advbench:eval --limit 64 --out runs/quick/eval.json

test:
	$(PY) -m pytest -q tests

test-unit:
	$(PY) -m pytest -q tests/unit
