"""Training and evaluation data, off the serving path: the towers' training loop
(``mmq train-default``), its datasets, sample sentences for tests and benchmarks,
and the photographs the image tower is evaluated on."""
