"""Pretraining data (report "Pretraining / Training Data" and "Filtering"): tokenizer training,
filtering, PII, deduplication, decontamination, staged mixtures and the tokenized, packed shards
that training reads. Nothing is imported here: each block is its own module."""
