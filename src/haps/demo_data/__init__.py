"""Embedded demo problems (original text): demo_hotpotqa.jsonl and demo_mmlu.jsonl, loaded by
`haps.data.load_problems(task)` through importlib.resources."""
