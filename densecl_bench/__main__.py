"""`python -m densecl_bench` (and `torchrun -m densecl_bench`) runs the CLI."""

from densecl_bench.cli import main

main()
