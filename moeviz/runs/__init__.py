"""Corpora traced to Parquet runs on disk, locally or through vLLM / SGLang servers, and read back."""
