"""The command line's pieces, one module per group of commands; `melt_bench.cli` assembles them."""
