"""Vitrine jobs package."""
