"""Vitrine common package."""
