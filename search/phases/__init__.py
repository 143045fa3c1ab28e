"""The phases of a search as Tune runs them: one trial (`trial`), the search (`search`:
TPE + the audited ASHA of `schedulers`), the confirmation and the ablation (`confirm`), and
what the driver shows while they run (`console`, TensorBoard's HParams view in `hparams`)."""
