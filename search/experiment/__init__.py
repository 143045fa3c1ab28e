"""The experiment's bookkeeping: its folder and the space it ran (`folder`), its trials as
rows (`trials`), the Optuna study and its searcher (`study`, `sampling`), the rung audit's
record (`audit`), the phases' records (`phases`), resume (`resume`) and storage faults
(`faults`). Below the phases and the answer: it imports neither."""
