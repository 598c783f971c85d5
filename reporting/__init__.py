"""The results of run folders as the tables, curves and recurring mistakes of make_report.py."""
