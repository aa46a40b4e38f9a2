"""Student distillation: dataset building, teacher caching, training, export, evaluation."""
