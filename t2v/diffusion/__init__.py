"""Rectified-flow objective and samplers, pure torch."""
