"""Knowledge-transfer losses for distilling IB-BERT into MobileBERT (docs/distillation.md)."""
