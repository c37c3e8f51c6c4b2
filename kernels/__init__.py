"""Kernel sources (C, Triton), installed as the package data ``tedepr_cli.csrc``."""
