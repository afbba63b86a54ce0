"""tlreg's benchmarks: one module per benchmark, each with `run(quick: bool) -> None`.

`python -m bench` runs every module here that defines `run` (`--quick`: tiny sizes, for CI);
`python -m bench NAME ...` runs some; `python -m bench.NAME` runs one with its own options.
Full runs rewrite their own `<!-- bench:NAME -->` section of docs/benchmarks.md.
"""
