# safeptq developer targets. `make demo` = set-up + the main job on the embedded default model.
PY := .venv/bin/python

.PHONY: setup demo test test-unit lint
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/safeptq eval --model default --suite advbench:eval --limit 64 --out runs/demo/eval.json

test:
	$(PY) -m pytest -q tests

test-unit:
	$(PY) -m pytest -q tests/unit
