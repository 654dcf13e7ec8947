"""Knowledge-transfer losses for distilling IB-BERT into MobileBERT (MOBILEBERT.md §3)."""
