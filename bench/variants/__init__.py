"""Settings variants: each imports dashboard.settings and changes one thing, so that
`python -m bench --variant NAME` measures a proposed change without touching the project.
Results go to bench/results/variant-NAME.json."""
