"""Heads: pooling, projections, region decoder, pixel decoder (see ../shared/DESIGN.md)."""
