"""Vitrine vitrine package."""
