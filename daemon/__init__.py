"""slurm-triage: explain, report and (opt-in) resubmit failed Slurm jobs."""

__version__ = "0.1.0"
