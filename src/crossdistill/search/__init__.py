"""Hyper-parameter search: ``crossdistill sweep`` (a grid of config values and seeds) and ``crossdistill tune``
(an Optuna study, the optional extra ``crossdistill[search]``). Every trial is a normal run directory."""
