# The two commands of README.md. Each sets up .venv itself (scripts/setup.sh).
.PHONY: demo test lint setup

setup:
	bash scripts/setup.sh

demo: setup
	mkdir -p runs
	.venv/bin/vaelab explain --json runs/explain.json --html runs/explain.html > /dev/null
	@echo "vaelab explain: every step holds; the derivation is in runs/explain.html"
	.venv/bin/vaelab train

test: setup
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check --fix src tests
	.venv/bin/ruff format src tests
