"""PerSRec: long-history sequential recommendation with personalised tokens (arXiv 2601.03479)."""
