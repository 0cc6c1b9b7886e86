"""Judge models: generation metrics, label scoring for classification, comparisons, evaluation during training."""
