"""The jobs: resize, merge, analyze, batch and demo. Each reads, plans, runs the engine and writes; nothing else
(job.py holds what resize and merge share)."""
