"""The answer of a search: the statistics (`stats`), the verdict (`decide`), importance
(`importance`), the answer dict (`build`) and the report with its plots (`report`,
`plots`). Reads the experiment's records; knows nothing of Tune's execution."""
