"""Evaluation: verification `.bin` sets, IJB-B/C 1:1, feature extraction, ONNX export.

    from partial_fc.eval import load_bin, metrics, evaluate_bins
"""
from . import metrics
from .bin_format import load_bin
from .verification import VerificationSet, evaluate_bins, load_verification_set

__all__ = ["load_bin", "metrics", "evaluate_bins", "VerificationSet", "load_verification_set"]
