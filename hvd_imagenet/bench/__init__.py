"""Benchmarks, each a CLI subcommand: a table on stdout, or --json."""
