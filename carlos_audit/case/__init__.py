"""The case: case file (TOML -> frozen Case), prompt protocol (suites, seeds, pairs)."""
