# Two commands matter: `make run` (the whole service on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install lint typecheck unit browser lock bench fuzz clean

run: install ## start API, admin, worker, Temporal dev server, PostgreSQL and capture SMTP
	$(BIN)/marquee dev

test: install browser lint typecheck ## ruff, mypy, then the whole suite with coverage
	$(BIN)/python -m pytest --cov --cov-report=term-missing:skip-covered --durations=15

unit: install ## the tests that need no servers: unit tests, and workflows on Temporal's time-skipping server
	$(BIN)/python -m pytest -q tests/unit tests/workflows

install: $(VENV)/.installed

# The venv is rebuilt from the hash-pinned lock whenever the lock or the project changes.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# Python 3.11's bundled pip (23.x) mishandles extras (coverage[toml]) in hash-checking mode.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==26.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy .

# The admin tests drive Debian's Chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || bash scripts/install-chromium.sh

lock: install ## re-resolve requirements.lock after changing dependencies in pyproject.toml
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --group dev --python-version 3.11 --generate-hashes --quiet -o requirements.lock

# Ceilings, then the service against them, in one run; bench.report rewrites docs/benchmarks.md
# and docs/benchmarks/*.png. `make bench BENCH_PROFILE=--profile` adds py-spy on the API and worker.
BENCH_PROFILE ?=
bench: install ## measure against the machine's ceilings: campaigns (1 and 2 workers, naive, peak RSS at 1M recipients), instant (open loop), events, analytics (docs/benchmarks.md)
	@# Bytecode as an installed package has it (pip compiles; the editable install does not, and
	@# PYTHONDONTWRITEBYTECODE machines never write it): the workflow sandbox re-imports workflow
	@# modules for every run, and would compile them from source each time.
	$(BIN)/python -m compileall -q activities admin api channels core entrypoints services workflows worker.py
	$(BIN)/python -m bench.ceilings --smtp-messages 100000 --workflows 600
	$(BIN)/python -m bench.campaign --recipients 100000 --workers 1,2 --naive 2000 --memory-recipients 1000000 $(BENCH_PROFILE)
	$(BIN)/python -m bench.instant --rates 25,50,100,150 --duration 20 $(BENCH_PROFILE)
	$(BIN)/python -m bench.instant --count 1000 --concurrency 32
	$(BIN)/python -m bench.events --count 1000 --concurrency 32
	$(BIN)/python -m bench.analytics --rows 10000000
	$(BIN)/python -m bench.admin_pages --notifications 1000000
	$(BIN)/python -m bench.report

fuzz: install ## Schemathesis against a dev stack of its own, every role and every check (FUZZ_EXAMPLES per operation)
	$(BIN)/python scripts/fuzz.py --max-examples $(or $(FUZZ_EXAMPLES),100)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache .coverage
