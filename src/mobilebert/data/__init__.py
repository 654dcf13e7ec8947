"""Pre-training data: corpus sources (built-in, text files, Hugging Face datasets) as lists of documents."""
