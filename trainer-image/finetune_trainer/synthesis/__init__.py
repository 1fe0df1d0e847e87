"""Synthetic data from a seed set (SyntheticDataset): generation, filters and the work-folder records.

    records.py    candidate ids, the work-folder files (candidates.jsonl, generation.json), lineage keys
    (the generation command, filters and review sampling live in the sibling modules; docs/synthetic-data.md)
"""
