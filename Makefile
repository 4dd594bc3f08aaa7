# vendgate developer commands. Every target creates the virtualenv it needs,
# so each one works on a fresh clone.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench bench-mixed bench-scaling bench-telemetry bench-storm bench-memory fuzz vectors clean mosquitto

# The tests and the demo start private Mosquitto brokers; PostgreSQL comes from a wheel.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing mosquitto (Debian package)"; \
			apt-get update -qq && apt-get install -y -qq mosquitto; \
		else \
			echo "vendgate needs the mosquitto binary: sudo apt-get install mosquitto" >&2; \
			exit 1; \
		fi; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: the whole pipeline on embedded defaults, with faults, in about a minute
demo: $(STAMP) mosquitto
	$(BIN)/vendgate demo

## test: the whole test suite (pure, component and integration tiers)
test: $(STAMP) mosquitto
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lint: ruff (rules and format) and mypy --strict, with no exceptions
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: short benchmarks that print what they measured, limits included (< 2 min): the codec,
## vends closed loop, and mixed: vends at 200/s with 1,000 Telemetry frames/s (bench-results/)
bench: $(STAMP) mosquitto
	mkdir -p bench-results
	$(BIN)/python -m benchmarks.codec --json bench-results/codec.json
	$(BIN)/vendgate bench --machines 50 --vends 2000 --json bench-results/vends-closed-loop.json
	$(BIN)/vendgate bench --profile mixed --machines 50 --vends 2000 --rate 200 \
		--telemetry-rate 1000 --json bench-results/mixed.json

## bench-mixed: vends at 200/s for 30 s, 2 % jams and 2 % no-drops (refunds), while the fleet
## publishes 1,000 Telemetry frames/s (~75 s)
bench-mixed: $(STAMP) mosquitto
	mkdir -p bench-results
	$(BIN)/vendgate bench --profile mixed --machines 50 --vends 6000 --rate 200 \
		--jam-rate 0.02 --no-drop-rate 0.02 --telemetry-rate 1000 \
		--json bench-results/mixed-30s.json

## bench-scaling: vends/s and CPU per vend at 1,000, 5,000 and 10,000 machines, and with 1
## versus 2 gateway processes (closed loop, 8,000 vends each; ~8 min)
bench-scaling: $(STAMP) mosquitto
	mkdir -p bench-results
	for m in 1000 5000 10000; do \
		$(BIN)/vendgate bench --no-limits --machines $$m --vends 8000 \
			--json bench-results/scaling-$$m-machines.json || exit 1; \
	done
	for g in 1 2; do \
		$(BIN)/vendgate bench --no-limits --machines 1000 --vends 8000 --gateways $$g \
			--json bench-results/scaling-$$g-gateways.json || exit 1; \
	done

## bench-telemetry: Telemetry frames to durable rows, with the MQTT and COPY limits (< 2 min)
bench-telemetry: $(STAMP) mosquitto
	mkdir -p bench-results
	$(BIN)/vendgate bench --profile telemetry --machines 1000 --messages 60000 \
		--json bench-results/telemetry.json

## bench-storm: restart the broker under 10,000 connected machines, API probed (~1-2 min)
bench-storm: $(STAMP) mosquitto
	mkdir -p bench-results
	$(BIN)/vendgate bench --profile storm --machines 10000 --json bench-results/storm.json

## bench-memory: gateway RSS at 0 to 10,000 connected machines, base + KiB per machine (~1 min)
bench-memory: $(STAMP) mosquitto
	mkdir -p bench-results
	$(BIN)/python -m benchmarks.gateway_memory --machines 0,1000,5000,10000 \
		--json bench-results/memory.json

## fuzz: coverage-guided fuzzing of the decoder with atheris (FUZZ_SECONDS, default 60)
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet 'atheris>=2.3'
	rm -rf .fuzz-work && mkdir -p .fuzz-work && cp tests/fuzz/corpus/*.bin .fuzz-work/
	$(BIN)/python -m tests.fuzz.fuzz_decode -max_total_time=$(FUZZ_SECONDS) -max_len=20000 \
		-rss_limit_mb=2048 -print_final_stats=1 .fuzz-work

## vectors: regenerate protocols/vectors/v1.json (review the diff before committing)
vectors: $(STAMP)
	$(BIN)/python -m protocols.vectors.generate

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
