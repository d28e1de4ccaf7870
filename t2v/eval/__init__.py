"""Scoring rendered videos against their prompts."""
