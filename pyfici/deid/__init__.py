"""De-identification building blocks: the k-Same partition (k-anonymity)."""

from pyfici.deid.k_same import KSame, check_k_anonymity, k_same

__all__ = ["KSame", "check_k_anonymity", "k_same"]
