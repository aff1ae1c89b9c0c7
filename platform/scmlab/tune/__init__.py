"""Scaling studies: compute accounting (`flops`), the scaling-law fit and results table (`scaling`), and their
plots (`plots`). Submodules are imported where used: `flops` needs torch, `scaling` numpy and scipy, `plots`
matplotlib."""
