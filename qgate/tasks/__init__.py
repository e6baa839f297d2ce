"""Local lm-eval tasks (YAML + data), usable offline with `TaskManager(include_path=...)`."""
