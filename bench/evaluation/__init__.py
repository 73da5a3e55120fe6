"""lm-eval on our models: the adapter, its logs, the byte tokenizer and the tiny tasks."""
