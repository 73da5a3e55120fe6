"""From rows to what people read: the HTML report, terminal tables, matched-memory verdicts, the model cards."""
