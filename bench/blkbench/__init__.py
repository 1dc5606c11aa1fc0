"""bench/compare as a package: see main.py."""
