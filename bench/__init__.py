"""The benchmark harness: the real stack on this machine, measured.

`make bench` (= `.venv/bin/python -m bench`) starts PostgreSQL-backed Daphne,
the Pinecall worker (`manage.py runworker pinecall`) and an in-process Pinecall
simulator, drives them like operators and customers would, and writes
`bench/results/latest.json` and the table in `bench/README.md`.

Sections (see README.md): fanout, round_trip, ingest, pages, memory.
"""
