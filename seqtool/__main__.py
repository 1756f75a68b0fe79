"""`python -m seqtool` runs the CLI."""
from seqtool.cli.app import main

main()
