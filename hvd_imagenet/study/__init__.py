"""`hvd-imagenet study`: the paper's Table 1 / Table 2a experiments at a scale a CPU can run.

grid.py says which `train` runs stand for which row of the paper (pure functions, tested without Horovod);
run.py launches them under horovodrun, one after another, resumably; report.py turns their metrics into
study.md (mean ± std over seeds) and the plots.
"""
