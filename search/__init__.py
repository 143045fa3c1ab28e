"""The trick search: Ray Tune + Optuna (TPE) + ASHA over TrainConfig runs, and the export
of the best trial. Knows nothing of tensors."""
