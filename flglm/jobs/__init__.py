"""Whole processes and jobs: one federation process (``train``), the centralized reference
(``train.run_centralized``), generation through the split (``generate``), and federations
started as child processes on this machine (``subprocesses``)."""
