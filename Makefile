# The two commands of README.md. Each sets up .venv itself (scripts/setup.sh).
.PHONY: demo test bench lint setup docs

setup:
	bash scripts/setup.sh

demo: setup
	mkdir -p runs
	.venv/bin/vaelab explain --json runs/explain.json --html runs/explain.html > /dev/null
	@echo "vaelab explain: every step holds; the derivation is in runs/explain.html"
	.venv/bin/vaelab train --out runs/demo --overwrite
	.venv/bin/vaelab evaluate runs/demo --iwae-k 1000
	.venv/bin/vaelab report runs/demo
	@echo "open runs/demo/report.html, or run: .venv/bin/vaelab serve runs/demo"

test: setup
	bash scripts/install-browser.sh
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/ruff format --check src tests benchmarks scripts
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
	.venv/bin/python -m pytest -q --durations=15

docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve --strict

bench: setup
	.venv/bin/python -m benchmarks

lint: setup
	.venv/bin/ruff check --fix src tests benchmarks scripts
	.venv/bin/ruff format src tests benchmarks scripts
