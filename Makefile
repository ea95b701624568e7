# Developer entry points. `make bench` runs thumbup-bench on the local stack
# (see docs/performance.md); BENCH_ARGS are passed to thumbup-bench, e.g.
#   make bench BENCH_ARGS="--duration-secs 5 --runs 3"
.PHONY: bench
bench:
	bash bench/run.sh $(BENCH_ARGS)
