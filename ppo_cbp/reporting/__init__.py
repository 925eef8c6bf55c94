"""Reporting of finished runs: statistics over seeds (bootstrap CIs, IQM), the method x metric
tables and the figures."""
