# anyprof — the commands a newcomer runs. `make help` lists them.

CARGO  ?= cargo
CC     ?= cc
TARGET := target/release
PROF   ?= prof

.PHONY: help build demo test test-matrix lint fmt bench fuzz clean

help:
	@echo "make demo   build anyprof and profile the bundled example (examples/demo.c)"
	@echo "make test   build everything and run all tests (unit + end-to-end)"
	@echo "make test-matrix  only the real-program matrix (python3, perl, sqlite3, gcc, git, xz, bash, sort, CPython's and GLib's tests)"
	@echo "make lint   cargo fmt --check and clippy with warnings denied"
	@echo "make fuzz   a short run of every fuzz target (FUZZ_SECONDS each, default 30)"
	@echo "make bench  the cost figures the README quotes, beside jemalloc, tcmalloc, heaptrack, gperftools (about 5 min)"

build:
	$(CARGO) build --release --workspace

$(TARGET)/demo: examples/demo.c
	@mkdir -p $(TARGET)
	$(CC) -O2 -g -pthread examples/demo.c -o $@

# Profile the example and show where its CPU time went.
demo: build $(TARGET)/demo
	$(TARGET)/anyprof record -o $(PROF)/demo -- $(TARGET)/demo 2
	@if command -v go >/dev/null; then go tool pprof -top -nodecount=12 $(PROF)/demo/cpu.pb.gz; \
	 else echo "(install golang-go to explore $(PROF)/demo/cpu.pb.gz with go tool pprof)"; fi

# The end-to-end tests run the release binaries, so build them first.
test: build
	$(CARGO) test --release --workspace

# Real programs nobody here wrote, with and without the profiler at its harshest settings.
test-matrix: build
	$(CARGO) test --release -p anyprof-tests --test matrix -- --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: build
	bash bench/run.sh

# The fuzz targets in fuzz/ (their own workspace), from the committed corpora.
fuzz:
	bash .ci/fuzz

clean:
	$(CARGO) clean
	rm -rf $(PROF)
