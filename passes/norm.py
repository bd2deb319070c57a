"""Norm rewrites: fold-ln-affine, ln-to-rmsnorm, ln-to-crmsnorm (passes-math.md section 1)."""
