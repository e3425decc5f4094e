"""The command-line programs: mlm-train, mlm-evaluate, mlm-fill-mask and mlm-prepare-data once mlm is installed
(pyproject.toml's [project.scripts]), scripts/*.py in a checkout. Each module's `main(argv)` does the work and
`run()` turns an MLMError into one line and exit status 2."""
