"""The packaged recipes and trainer defaults (YAML), found by name: ``effitrain fit --config quickstart``."""
