"""Bulk rendering of prompt files on Ray Data."""
