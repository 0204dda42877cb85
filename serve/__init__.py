"""Vitrine serve package."""
