"""Margins, surrogate margins, conditioner limits, KKT residuals, exact references."""

from ._margins import normalized_margin as normalized_margin
