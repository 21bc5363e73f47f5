"""Nipype interfaces: thin wrappers over the library."""
