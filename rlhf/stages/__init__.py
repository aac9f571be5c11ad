"""The stages, one room each: `<stage>/config.py` holds its typed block (and is all that loading
`pipelines.yaml` imports), `<stage>/recipe.py` the work it does, run by `rlhf.lifecycle.run_stage`."""
