"""The applications: commands that orchestrate runs and write reports, on top of the engine/ library.

    runner.py    train many runs (finished ones re-used, unfinished ones resumed; in-process or N workers)
    sweep.py     `engine sweep`: a grid × seeds, chosen on val, test as mean ± std
    study.py     `engine study`: the papers' comparison (configs, post hoc, aggregation)
    claims.py    the study's four claims, pure functions of its numbers
    study_report.py  study.md and the RS γ plots
    checkpoints.py  `engine eval | calibrate | rescale` on a checkpoint (files and console output)
    compare.py   `engine compare` across run folders

Nothing in engine/ (the library) imports from here.
"""
